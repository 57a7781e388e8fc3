"""Time the linear assignment backends of ``autoperm.solvers.lap`` on weight-matching-like costs.

Costs (float64, maximised):

- ``planted``: ``N(0, 1)`` noise plus ``--signal`` (default 6) on a random permutation, like the
  cost of a planted pair (the planted permutation is the optimum);
- ``random``: ``N(0, 1)``, like the first cost of two independently initialised models.

For each size, kind and backend the script prints the median and minimum of ``--repeats`` solves
and checks that every backend reaches the same optimum (relative difference below 1e-9) as the
first exact backend. ``auction+warm`` starts the auction from the prices of a solve of the same
cost plus 1% noise (the next sweep of weight matching sees a slightly changed cost).

    python benchmarks/bench_lap.py --sizes 1024,2048,4096 --repeats 5
    python benchmarks/bench_lap.py --sizes 8192,11008,14336 --kinds planted --methods lapx --repeats 3
    python benchmarks/bench_lap.py --device cuda --methods scipy,lapx,auction,auction+warm
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from autoperm.solvers.lap import available_methods, linear_assignment


def make_cost(kind: str, n: int, signal: float, seed: int) -> np.ndarray:
    """A planted or random ``n x n`` float64 cost."""
    rng = np.random.default_rng(seed)
    cost = rng.standard_normal((n, n))
    if kind == "planted":
        cost[np.arange(n), rng.permutation(n)] += signal
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--kinds", default="planted,random")
    parser.add_argument("--methods", default=",".join(available_methods()),
                        help="comma list of scipy, lapx, auction, auction+warm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--signal", type=float, default=6.0)
    parser.add_argument("--device", default="cpu", help="where the auction's score lives")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip a method at larger sizes once one solve took longer than this")
    args = parser.parse_args()
    device = torch.device(args.device)
    methods = args.methods.split(",")
    too_slow: set[tuple[str, str]] = set()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print("| n | cost | method | median s | min s | runs | gap | same optimum |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            cost = make_cost(kind, n, args.signal, seed=n)
            tensor = torch.from_numpy(cost).to(device)
            reference: float | None = None
            for method in methods:
                if (method, kind) in too_slow:
                    print(f"| {n} | {kind} | {method} | skipped (> {args.max_seconds:g} s at a smaller n) | | | | |")
                    continue
                prices = None
                if method == "auction+warm":
                    nudged = cost + 0.01 * np.random.default_rng(1).standard_normal(cost.shape)
                    prices = linear_assignment(torch.from_numpy(nudged).to(device), method="auction").prices
                times, result = [], None
                for _ in range(args.repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    if method.startswith("auction"):
                        result = linear_assignment(tensor, method="auction", prices=prices)
                    else:
                        result = linear_assignment(cost, method=method)  # type: ignore[arg-type]
                    times.append(time.perf_counter() - start)
                    if times[-1] > args.max_seconds:
                        too_slow.add((method, kind))
                        break
                assert result is not None
                if reference is None and result.gap == 0.0:
                    reference = result.value
                same = "" if reference is None else ("yes" if abs(result.value - reference) <= 1e-9 * abs(reference) else "NO")
                print(f"| {n} | {kind} | {method} | {statistics.median(times):.3f} | {min(times):.3f} | "
                      f"{len(times)} | {result.gap:.2g} | {same} |", flush=True)


if __name__ == "__main__":
    main()
