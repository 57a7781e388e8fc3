"""Shared pipeline of the example scripts: train two models, weight-match, measure, plot.

Not part of the autoperm package; the scripts next to this file import it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import autoperm
from autoperm.evaluate import barrier_summary, interpolation_curve, l2_distance, singular_analysis
from autoperm.infer import infer_spec

logger = logging.getLogger("autoperm.examples")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every example shares."""
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per model")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 1), metavar=("SEED_A", "SEED_B"))
    parser.add_argument("--points", type=int, default=25, help="points on each interpolation curve")
    parser.add_argument("--gamma", type=float, default=0.3, help="singular-value threshold of R")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("lmc-out"), help="folder for checkpoints, JSON and plots")


def train(
    model: nn.Module, loader: DataLoader, epochs: int, lr: float, device: str, optimizer: str = "adam"
) -> nn.Module:
    """Plain cross-entropy training; Adam for MLPs, SGD momentum + cosine schedule for CNNs."""
    model.to(device).train()
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    for epoch in range(epochs):
        for inputs, targets in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(inputs.to(device)), targets.to(device))
            loss.backward()
            opt.step()
            if optimizer != "adam":
                schedule.step()
        logger.info("epoch %d/%d, last batch loss %.4f", epoch + 1, epochs, float(loss.detach()))
    return model.eval().cpu()


def run(
    args: argparse.Namespace,
    build: Callable[[], nn.Module],
    example_input: torch.Tensor,
    train_loader: DataLoader,
    test_loader: DataLoader,
    optimizer: str = "adam",
) -> dict[str, Any]:
    """Train (or load) two models, align B to A by weight matching, write barriers, R and plots."""
    args.out.mkdir(parents=True, exist_ok=True)
    state_dicts = []
    for name, seed in zip("ab", args.seeds):
        path = args.out / f"model_{name}.pt"
        if path.exists():
            state_dicts.append(autoperm.load_state_dict(path))
            continue
        torch.manual_seed(seed)
        model = train(build(), train_loader, args.epochs, args.lr, args.device, optimizer)
        autoperm.save_state_dict(model.state_dict(), path)
        state_dicts.append(model.state_dict())
    sd_a, sd_b = state_dicts
    template = build()
    spec = infer_spec(template, (example_input,))
    result = autoperm.weight_matching(spec, sd_a, sd_b, device=args.device)
    sd_b_aligned = autoperm.apply_permutation(spec, result.perms, sd_b)
    autoperm.save_state_dict(sd_b_aligned, args.out / "model_b_aligned.pt")
    splits = {"train": train_loader, "test": test_loader}
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in template.modules())
    reset = train_loader if has_bn else None
    curves = {
        label: interpolation_curve(template, sd_a, b, splits, args.points, reset_bn=reset, device=args.device)
        for label, b in (("naive", sd_b), ("weight matching", sd_b_aligned))
    }
    report = {
        "barriers": {label: barrier_summary(c) for label, c in curves.items()},
        "l2_distance": {"naive": l2_distance(sd_a, sd_b).to_dict(), "weight matching": l2_distance(sd_a, sd_b_aligned).to_dict()},
        "alignment": {
            "naive": singular_analysis(spec, sd_a, sd_b, args.gamma).to_dict(spectra=False),
            "weight matching": singular_analysis(spec, sd_a, sd_b_aligned, args.gamma).to_dict(spectra=False),
        },
        "curves": {label: c.to_dict() for label, c in curves.items()},
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    from autoperm.evaluate.plots import plot_interpolation

    plot_interpolation(curves, args.out / "interpolation.png")
    for label, barriers in report["barriers"].items():
        logger.info("%s: test loss barrier %.4f", label, barriers["test_loss"]["mean"])
    return report
