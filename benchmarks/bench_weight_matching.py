"""Benchmark autoperm's weight matching against a cache-free reference and the `rebasin` package.

Three solvers on the same model pairs (A seeded with ``--seed``, B with ``--seed + 1``):

- autoperm: :func:`autoperm.weight_matching` (cached products, skipped unchanged groups).
- reference: Git Re-Basin's loop as usually written (arXiv 2209.04836, Algorithm 1): every visit
  of a group rebuilds its cost matrix from all members. Same spec, seed, group order and LAP
  solver as autoperm, so it must reach the same permutations ("same perms").
- rebasin (``--rebasin``): ``rebasin.PermutationCoordinateDescent(model_a, model_b, x).rebasin()``
  from PyPI (its own graph tracing, counted separately as "rb init"). Its objective and L2 are
  computed here from the state dict it leaves in model B, over the same tensors as autoperm's.

Objective: ``sum <A, pi(B)>`` over the spec's cost tensors (weights, biases, norm affine; no
running stats). L2: ``||A - pi(B)||`` over all of them. Times are medians of ``--repeats`` runs.
``--memory`` measures the peak RSS of weight matching in a fresh subprocess per model (state
dicts loaded from disk first, so the baseline is just them) and reports it over their size.

Run (torchvision and rebasin live in their own environment, see benchmarks/README.md)::

    python benchmarks/bench_weight_matching.py [--models resnet18,mobilenet_v2,vgg11_224]
        [--rebasin] [--memory] [--repeats 3] [--device cuda]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import autoperm
from autoperm.solvers.result import is_cost_tensor
from autoperm.spec import PermutationSpec, member_matrix, permute_tensor


def reference_weight_matching(spec, sd_a, sd_b, seed=0, max_iter=100, device="cpu"):
    """Coordinate descent rebuilding every cost matrix on every visit (no caching)."""
    perms = {g.name: torch.arange(g.size) for g in spec.active_groups}
    groups = list(spec.active_groups)
    a = {k: v.to(device) for k, v in sd_a.items()}
    b = {k: v.to(device) for k, v in sd_b.items()}
    rng = np.random.default_rng(seed)
    for sweep in range(1, max_iter + 1):
        progress = sweep == 1
        order = rng.permutation(len(groups))
        pending = {g.name for g in groups} if sweep == 1 else set()
        for index in order if sweep > 1 else range(len(groups)):  # autoperm's schedule: informed first sweep
            group = groups[index]
            cost = torch.zeros(group.size, group.size, dtype=torch.float64, device=device)
            for member in group.members:
                if not is_cost_tensor(member.param, a[member.param]):
                    continue
                if ({g.name for g, _ in spec.members_by_param[member.param]} - {group.name}) & pending:
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
            pending.discard(group.name)
        if not progress:
            break
    return perms, sweep


def _models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """Model factories and input shapes; torchvision's only where it is installed."""
    from autoperm.models import resnet20, vgg11

    models = {
        "resnet20x4": (lambda: resnet20(width=4), (1, 3, 32, 32)),
        "vgg11_32": (lambda: vgg11(), (1, 3, 32, 32)),
        "autoperm_vgg11_224": (lambda: vgg11(classifier_width=4096, image_size=224), (1, 3, 224, 224)),
    }
    try:
        import torchvision.models as tv
    except ImportError:
        return models
    models.update({
        "resnet18": (lambda: tv.resnet18(num_classes=10), (1, 3, 224, 224)),
        "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), (1, 3, 224, 224)),
        "vgg11_224": (lambda: tv.vgg11(num_classes=10), (1, 3, 224, 224)),
    })
    return models


def _pair(name: str, seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    factory, shape = _models()[name]
    torch.manual_seed(seed)
    model_a = factory().eval()
    torch.manual_seed(seed + 1)
    model_b = factory().eval()
    return model_a, model_b, torch.randn(shape)


def _time(function: Callable[[], object], repeats: int, device: str) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _scores(spec: PermutationSpec, sd_a, aligned) -> tuple[float, float]:
    """Objective ``sum <A, B'>`` and ``||A - B'||`` over the spec's cost tensors."""
    names = [k for k in spec.members_by_param if is_cost_tensor(k, sd_a[k])]
    objective = sum(float((sd_a[k].double() * aligned[k].double()).sum()) for k in names)
    l2 = sum(float(((sd_a[k].double() - aligned[k].double()) ** 2).sum()) for k in names) ** 0.5
    return objective, l2


def _run_rebasin(model_a: nn.Module, model_b: nn.Module, example: torch.Tensor, seed: int, device: str):
    """One rebasin run on copies; returns (init seconds, solve seconds, aligned state dict, B's function kept)."""
    import rebasin

    a, b = copy.deepcopy(model_a).to(device), copy.deepcopy(model_b).to(device)
    x = example.to(device)
    torch.manual_seed(seed)  # rebasin draws its group order from torch's global generator
    start = time.perf_counter()
    solver = rebasin.PermutationCoordinateDescent(a, b, x, device_a=device, device_b=device)
    middle = time.perf_counter()
    solver.rebasin()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    end = time.perf_counter()
    with torch.no_grad():  # relative to the output's scale: freshly initialised nets can output ~1e-9
        reference = model_b.to(device)(x)
        kept = float((b(x) - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    return middle - start, end - middle, {k: v.cpu() for k, v in b.state_dict().items()}, kept


def _peak_memory(name: str, seed: int, device: str) -> tuple[float, float]:
    """Peak RSS growth of one weight matching in a fresh process, in units of the two state dicts."""
    child = subprocess.run(
        [sys.executable, __file__, "--child-memory", name, "--seed", str(seed), "--device", device],
        check=True, capture_output=True, text=True,
    )
    size, extra = (int(v) for v in child.stdout.split()[-2:])
    return extra / size, (size + extra) / size


def _child_memory(name: str, seed: int, device: str) -> None:
    """Child process of ``--memory``: print the state dicts' size and the peak RSS growth (bytes).

    The pair is rebuilt here (no file loading); the baseline is the resident size just before
    weight matching and the peak the largest resident size a thread samples every 0.5 ms while
    it runs (the process high-water mark would include spikes from building the models).
    """
    model_a, model_b, example = _pair(name, seed)
    spec = autoperm.infer_spec(model_a, (example,))
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    size = sum(t.numel() * t.element_size() for sd in (sd_a, sd_b) for t in sd.values())
    # The first large BLAS and LAP calls allocate per-thread work buffers once per process (tens of
    # MB, whatever the model): make them before the baseline so that only the solver is measured.
    warm = torch.randn(512, 4608)
    linear_sum_assignment((warm @ warm.T).double().numpy())
    del warm
    before = _rss()
    samples = [before]
    done = threading.Event()

    def sample() -> None:  # the high-water mark (ru_maxrss) would also count earlier spikes
        while not done.is_set():
            samples.append(_rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    autoperm.weight_matching(spec, sd_a, sd_b, device=device)
    done.set()
    sampler.join()
    peak = max(samples)
    print(size, max(0, peak - before))


def _rss() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated; default: torchvision's if installed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebasin", action="store_true", help="also run the PyPI package rebasin")
    parser.add_argument("--memory", action="store_true", help="peak memory in a fresh subprocess per model")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        _child_memory(args.child_memory, args.seed, args.device)
        return
    available = _models()
    default = [m for m in ("resnet18", "mobilenet_v2", "vgg11_224") if m in available] or ["resnet20x4", "vgg11_32", "autoperm_vgg11_224"]
    names = args.models.split(",") if args.models else default
    reference_repeats = args.reference_repeats or args.repeats
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats} "
          f"reference_repeats={reference_repeats} seed={args.seed}")
    print(f"{'model':20s} {'solver':9s} {'time s':>8s} {'ratio':>7s} {'sweeps':>6s} {'objective':>12s} "
          f"{'L2':>10s} {'note':s}")
    for name in names:
        model_a, model_b, example = _pair(name, args.seed)
        spec = autoperm.infer_spec(model_a, (example,))
        sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
        objective0, l2_0 = _scores(spec, sd_a, sd_b)
        print(f"{name:20s} {'none':9s} {'':>8s} {'':>7s} {'':>6s} {objective0:12.6g} {l2_0:10.6g} "
              f"{sum(t.numel() for t in sd_a.values()) / 1e6:.1f}M params, {len(spec.active_groups)} groups")
        ours_time, ours = _time(lambda: autoperm.weight_matching(spec, sd_a, sd_b, seed=args.seed, device=args.device),
                                args.repeats, args.device)
        objective, l2 = _scores(spec, sd_a, autoperm.apply_permutation(spec, {k: v.cpu() for k, v in ours.perms.items()}, sd_b))
        note = ""
        if args.memory:
            extra, total = _peak_memory(name, args.seed, args.device)
            note = f"peak extra {extra:.2f}x, total {total:.2f}x the two state dicts"
        print(f"{'':20s} {'autoperm':9s} {ours_time:8.2f} {1.0:6.1f}x {ours.n_iter:6d} {objective:12.6g} {l2:10.6g} {note}",
              flush=True)
        if not args.no_reference:
            ref_time, (ref_perms, ref_sweeps) = _time(
                lambda: reference_weight_matching(spec, sd_a, sd_b, seed=args.seed, device=args.device),
                reference_repeats, args.device)
            same = all(torch.equal(ours.perms[g].cpu(), ref_perms[g].cpu()) for g in ref_perms)
            objective, l2 = _scores(spec, sd_a, autoperm.apply_permutation(spec, {k: v.cpu() for k, v in ref_perms.items()}, sd_b))
            print(f"{'':20s} {'reference':9s} {ref_time:8.2f} {ref_time / ours_time:6.1f}x {ref_sweeps:6d} {objective:12.6g} "
                  f"{l2:10.6g} same perms as autoperm: {same}", flush=True)
        if args.rebasin:
            runs = [_run_rebasin(model_a, model_b, example, args.seed, args.device) for _ in range(args.repeats)]
            rb_time = statistics.median(r[1] for r in runs)
            objective, l2 = _scores(spec, sd_a, runs[-1][2])
            print(f"{'':20s} {'rebasin':9s} {rb_time:8.2f} {rb_time / ours_time:6.1f}x {'?':>6s} {objective:12.6g} {l2:10.6g} "
                  f"rb init {statistics.median(r[0] for r in runs):.2f} s; B's function kept: {runs[-1][3]}", flush=True)


if __name__ == "__main__":
    main()
