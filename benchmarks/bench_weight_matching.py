"""Benchmark autoperm's weight matching against a cache-free reference implementation.

The reference is Git Re-Basin's loop as usually written: every visit of a group rebuilds its
cost matrix from all members. Both use the same spec, seeds, group order and LAP solver, so
they reach the same permutations; the difference is the cached products.

Run: ``python benchmarks/bench_weight_matching.py [--device cuda] [--repeats 3] [--quick]``.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import autoperm
from autoperm.models import resnet20, vgg11
from autoperm.solvers.result import is_cost_tensor
from autoperm.spec import PermutationSpec, member_matrix, permute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def reference_weight_matching(spec, sd_a, sd_b, seed=0, max_iter=100, device="cpu"):
    """Coordinate descent rebuilding every cost matrix on every visit (no caching)."""
    perms = {g.name: torch.arange(g.size) for g in spec.active_groups}
    groups = list(spec.active_groups)
    a = {k: v.to(device) for k, v in sd_a.items()}
    b = {k: v.to(device) for k, v in sd_b.items()}
    rng = np.random.default_rng(seed)
    for sweep in range(1, max_iter + 1):
        progress = False
        for index in rng.permutation(len(groups)):
            group = groups[index]
            cost = torch.zeros(group.size, group.size, dtype=torch.float64, device=device)
            for member in group.members:
                if not is_cost_tensor(member.param, a[member.param]):
                    continue
                permuted = permute_tensor(spec, perms, member.param, b[member.param], skip={group.name})
                cost += (member_matrix(a[member.param], member, group.size)
                         @ member_matrix(permuted, member, group.size).T).double()
            cost = cost.cpu().numpy()
            _, columns = linear_sum_assignment(cost, maximize=True)
            rows = np.arange(group.size)
            old, new = cost[rows, perms[group.name].numpy()].sum(), cost[rows, columns].sum()
            if new - old > 1e-12 * max(1.0, abs(old)):
                perms[group.name] = torch.as_tensor(columns)
                progress = True
        if not progress:
            break
    return perms, sweep


def _spec(model: nn.Module, example: torch.Tensor) -> PermutationSpec:
    try:
        from autoperm.infer import infer_spec

        return infer_spec(model, (example,))
    except ImportError:
        from _specs import resnet20_spec

        return resnet20_spec(model) if hasattr(model, "layer1") else vgg_spec(model)


def vgg_spec(model: nn.Module) -> PermutationSpec:
    """Hand-written spec of autoperm's VGG (used when spec inference is not available)."""
    from _specs import bn, build_spec

    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    linears = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]
    flat = model.classifier[0].in_features // layers[convs[-1]].out_channels
    groups = {}
    for n, i in enumerate(convs):
        members = [(f"features.{i}.weight", 0), *bn(f"features.{i + 1}")]
        members.append((f"features.{convs[n + 1]}.weight", 1) if n + 1 < len(convs) else ("classifier.0.weight", 1, flat))
        groups[f"conv{n}"] = members
    for n, i in enumerate(linears[:-1]):
        groups[f"fc{n}"] = [(f"classifier.{i}.weight", 0), (f"classifier.{i}.bias", 0),
                            (f"classifier.{linears[n + 1]}.weight", 1)]
    return build_spec(model, groups)


class PeakMemory:
    """Peak resident set size above the starting level, sampled every 5 ms from /proc."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *_):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * 4096


def _time(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _l2(spec, sd_a, sd_b, perms) -> float:
    aligned = autoperm.apply_permutation(spec, perms, sd_b)
    return sum(float(((sd_a[k].double() - aligned[k].double()) ** 2).sum()) for k in sd_a if is_cost_tensor(k, sd_a[k])) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small models only")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [
        ("resnet20 x4 (4.3M)", lambda: resnet20(width=4), (1, 3, 32, 32), args.repeats),
        ("vgg11 32px, fc 512", lambda: vgg11(), (1, 3, 32, 32), args.repeats),
    ]
    if not args.quick:
        cases += [
            ("resnet20 x8 (17M)", lambda: resnet20(width=8), (1, 3, 32, 32), 1),
            ("vgg11 224px, 25088->4096->4096", lambda: vgg11(classifier_width=4096, image_size=224), (1, 3, 224, 224), 1),
        ]
    print(f"device={args.device} threads={torch.get_num_threads()}")
    header = f"{'model':34s} {'autoperm s':>10s} {'ref s':>8s} {'speedup':>8s} {'sweeps':>6s} {'same perms':>10s} " \
             f"{'objective':>12s} {'L2 before':>10s} {'L2 after':>10s} {'peak/2 sd':>9s}"
    print(header)
    for name, factory, shape, repeats in cases:
        model_a, model_b = factory(), factory()
        spec = _spec(model_a, torch.randn(shape))
        sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
        del model_a, model_b
        size = sum(t.numel() * t.element_size() for t in sd_a.values()) * 2
        with PeakMemory() as memory:
            ours_time, ours = _time(lambda: autoperm.weight_matching(spec, sd_a, sd_b, device=args.device), 1)
        if repeats > 1:
            ours_time, ours = _time(lambda: autoperm.weight_matching(spec, sd_a, sd_b, device=args.device), repeats)
        ref_time, (ref_perms, _) = _time(lambda: reference_weight_matching(spec, sd_a, sd_b, device=args.device), repeats)
        same = all(torch.equal(ours.perms[g], ref_perms[g]) for g in ref_perms)
        print(f"{name:34s} {ours_time:10.2f} {ref_time:8.2f} {ref_time / ours_time:7.1f}x {ours.n_iter:6d} {str(same):>10s} "
              f"{ours.objective:12.5g} {_l2(spec, sd_a, sd_b, {}):10.4g} {_l2(spec, sd_a, sd_b, ours.perms):10.4g} "
              f"{(memory.extra + size) / size:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
