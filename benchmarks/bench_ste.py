"""STE steps per second on the demo's MLPs, and what the cheap projection saves.

Trains two 3-layer MLPs of each ``--widths`` on scikit-learn's digits (the demo's recipe, Adam
1e-3, ``--epochs`` epochs), weight-matches them, then times:

- ``ste_matching`` for ``--steps`` steps with STE-MM's settings (Adam lr 1e-3, batch 256), its
  projection counts (LAPs solved, assignments certified optimal without a LAP) and how many of
  B's units its final permutation moved away from weight matching's;
- the plain per-step projection the literature uses (``weight_matching`` warm-started from the
  previous permutation, every step), for ``--reference-steps`` projections of the same kind of
  targets, as seconds per projection.

Run from the repository root (one job at a time on a shared machine)::

    python benchmarks/bench_ste.py --widths 128,256,512 --steps 300

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import time

import torch

from autoperm.data import load_digits
from autoperm.demo import train_classifier
from autoperm.infer import infer_spec
from autoperm.models import MLP
from autoperm.solvers import ste_matching, weight_matching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="128,256,512")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--reference-steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits()
    print(f"{'width':>6}{'steps':>7}{'steps/s':>9}{'LAPs':>7}{'certified':>10}{'moved %':>9}{'WM proj. s':>12}")
    for width in (int(w) for w in args.widths.split(",")):
        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(train_classifier(MLP(64, width, 3, 10), data, args.epochs, seed=seed))
        sd_a, sd_b = (m.state_dict() for m in models)
        spec = infer_spec(models[0], (data.train[0][:2],))
        wm = weight_matching(spec, sd_a, sd_b)
        result = ste_matching(spec, models[0], sd_a, sd_b, data.train, steps=args.steps, init_perms=wm.perms)
        moved = sum(int((result.perms[g] != wm.perms[g]).sum()) for g in wm.perms)
        total = sum(p.numel() for p in wm.perms.values())
        # the literature's projection: full weight matching warm-started, once per step
        perms = wm.perms
        generator = torch.Generator().manual_seed(0)
        clock = time.perf_counter()
        for step in range(args.reference_steps):
            target = {k: v + 0.01 * (step + 1) * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                      for k, v in sd_a.items()}
            perms = weight_matching(spec, target, sd_b, init_perms=perms, seed=step).perms
        reference = (time.perf_counter() - clock) / args.reference_steps
        stats = result.projection
        print(f"{width:>6}{result.steps:>7}{result.steps_per_second:>9.1f}{stats.lap_solves:>7}{stats.certified:>10}"
              f"{100 * moved / total:>9.1f}{reference:>12.3f}")


if __name__ == "__main__":
    main()
