"""Barrier and time of generalised matching against its sweep tolerance and sweep budget, on the ViT families.

Trains the ``vit`` and ``hf-vit`` pairs of ``lmc_families.py`` (seeds 0 and 1, the families'
recipes: the same models as its report), aligns B to A with ``symmetries="orthogonal"`` at each
``sweep_tol`` (and, with ``--budgets``, at each ``max_sweeps`` with ``sweep_tol`` 0) and prints
sweeps, time and the 13-point test-loss barrier.

    python benchmarks/generalised_sweeps.py                  # about 10 minutes on 2 cores
    python benchmarks/generalised_sweeps.py --families vit --tolerances 0 1e-3
    python benchmarks/generalised_sweeps.py --tolerances 0 --budgets 1 2 5 10
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lmc_families as families  # noqa: E402

import autoperm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["vit", "hf-vit"], choices=list(families.FAMILIES))
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.0, 1e-4, 1e-3])
    parser.add_argument("--budgets", nargs="*", type=int, default=[], help="sweep budgets (max_sweeps) to run as well")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    for name in args.families:
        family = families.FAMILIES[name]
        splits, eval_splits, example = families._family_data(family)
        with tqdm(total=(family.steps or family.epochs) * 2, desc=f"{name}: training", file=sys.stderr, leave=False) as bar:
            models = [families.train(family, family.build(family.width, seed), splits, seed, bar) for seed in (0, 1)]
        sd_a, sd_b = (families._snapshot(model) for model in models)
        model, evaluate = models[0], families.evaluator(eval_splits)
        spec = autoperm.infer_spec(model, example)

        def barrier(state_dict: dict[str, torch.Tensor]) -> float:
            curve = autoperm.interpolation_curve(model, sd_a, state_dict, evaluate, num_points=13)
            return autoperm.barrier_summary(curve)["test_loss"]["mean"]

        print(f"{name}: naive barrier {barrier(sd_b):.3f}", flush=True)
        settings = [(f"sweep_tol {tolerance:g}", {"sweep_tol": tolerance}) for tolerance in args.tolerances]
        settings += [(f"max_sweeps {budget}", {"max_sweeps": budget}) for budget in args.budgets]
        for label, setting in settings:
            started = time.perf_counter()
            result = autoperm.align(spec, sd_a, sd_b, symmetries="orthogonal", **setting)
            seconds = time.perf_counter() - started
            print(f"{name}: {label}: {result.sweeps} sweeps, {seconds:.2f} s, "
                  f"barrier {barrier(result.state_dict):.3f}, objective {result.objective:.2f}", flush=True)


if __name__ == "__main__":
    main()
