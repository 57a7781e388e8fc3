"""Time spec inference against Torch-Pruning's dependency-graph builder.

For each torchvision model (batch 1, 3 x 224 x 224 input) this times ``autoperm.infer_spec`` and
``torch_pruning.DependencyGraph().build_dependency`` the same way: the first (cold) call on a
freshly built model, then the median of ``--repeats`` warm calls. Warm calls of the two tools are
interleaved so that load from other processes falls on both alike. Both tools see the same model
and input; Torch-Pruning runs one real forward pass, autoperm propagates shapes on meta tensors.

Needs torchvision and torch-pruning (``pip install torchvision torch-pruning``).
Run: ``python benchmarks/bench_infer.py [--models resnet18 resnet50 densenet121] [--repeats 7]
[--size 224] [--threads N] [--profile MODEL]``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

try:
    import torch_pruning
    import torchvision
except ImportError as error:  # pragma: no cover - depends on the environment
    sys.exit(f"bench_infer needs torchvision and torch-pruning: {error}")

from autoperm.infer import infer_spec


@dataclass(frozen=True)
class Timing:
    cold: float
    warm: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.warm)

    @property
    def best(self) -> float:
        return min(self.warm)


def run_autoperm(model: nn.Module, example: torch.Tensor) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return len(infer_spec(model, example).active_groups)


def run_torch_pruning(model: nn.Module, example: torch.Tensor) -> int:
    graph = torch_pruning.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    return len(graph.module2node)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench_model(name: str, size: int, repeats: int) -> tuple[Timing, Timing, int]:
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    example = torch.randn(1, 3, size, size)
    tools = {"autoperm": run_autoperm, "torch-pruning": run_torch_pruning}
    cold = {tool: timed(lambda f=f: f(model, example)) for tool, f in tools.items()}
    warm: dict[str, list[float]] = {tool: [] for tool in tools}
    for _ in range(repeats):
        for tool, f in tools.items():
            warm[tool].append(timed(lambda f=f: f(model, example)))
    groups = run_autoperm(model, example)
    return Timing(cold["autoperm"], warm["autoperm"]), Timing(cold["torch-pruning"], warm["torch-pruning"]), groups


def profile(name: str, size: int, top: int = 25) -> None:
    """cProfile of warm autoperm calls on one model, sorted by cumulative then own time."""
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    example = torch.randn(1, 3, size, size)
    run_autoperm(model, example)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        run_autoperm(model, example)
    profiler.disable()
    print(f"\ncProfile of 5 warm infer_spec calls on {name} ({size}x{size}):")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "densenet121"])
    parser.add_argument("--repeats", type=int, default=7, help="warm calls per tool (median reported)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", metavar="MODEL", help="also print a cProfile of warm calls on MODEL")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch-pruning "
          f"{getattr(torch_pruning, '__version__', '?')}, {torch.get_num_threads()} threads, "
          f"input 1x3x{args.size}x{args.size}, {args.repeats} warm calls (median)")
    header = (f"{'model':<14}{'groups':>7}{'autoperm cold':>15}{'warm median':>13}{'(min)':>8}"
              f"{'TP cold':>10}{'warm median':>13}{'(min)':>8}{'ratio':>8}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        autoperm_time, pruning_time, groups = bench_model(name, args.size, args.repeats)
        ratio = autoperm_time.median / pruning_time.median
        print(f"{name:<14}{groups:>7}{autoperm_time.cold:>14.3f}s{autoperm_time.median:>12.3f}s"
              f"{autoperm_time.best:>7.3f}s{pruning_time.cold:>9.3f}s{pruning_time.median:>12.3f}s"
              f"{pruning_time.best:>7.3f}s{ratio:>7.2f}x", flush=True)
    print("TP = Torch-Pruning's DependencyGraph.build_dependency; ratio = autoperm warm median / TP warm"
          " median (below 1: autoperm is faster)")
    if args.profile:
        profile(args.profile, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
