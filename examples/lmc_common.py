"""Shared pipeline of the example scripts: train three models, then run autoperm's full report.

Not part of the autoperm package; the scripts next to this file import it. The report is the
one ``autoperm demo`` prints (:func:`autoperm.demo.run_experiment`): naive, weight matching
(several seeds), activation matching and STE; barriers, L2 distance, the alignment R at gamma
0 and 0.3; the anchor scheme with three models and MergeMany; and which of the three findings of
Ito et al. (arXiv 2402.04051) reproduced.

STE follows the recipe of Ito et al.'s follow-up code (github e5-a/STE-MM,
``configs/rebasin/method/ste.yaml``: Adam lr 1e-3, batch 256, 10 epochs, final projection);
``--ste-optimizer sgd`` gives Git Re-Basin's (``src/mnist_mlp_ste2.py``: SGD momentum 0.9,
lr 1e-2, batch 1000 there).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import autoperm
from autoperm.demo import DemoConfig, format_report, run_experiment
from autoperm.infer import infer_spec

logger = logging.getLogger("autoperm.examples")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every example shares."""
    parser.add_argument("--root", default="data", help="folder holding the torchvision dataset")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset into --root")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per model")
    parser.add_argument("--lr", type=float, default=1e-3, help="training learning rate")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--seeds", type=int, nargs=3, default=(0, 1, 2), metavar=("A", "B", "C"))
    parser.add_argument("--points", type=int, default=25, help="points on each interpolation curve")
    parser.add_argument("--wm-seeds", type=int, default=5, help="weight-matching runs (mean and std)")
    parser.add_argument("--ste-epochs", type=float, default=10, help="STE epochs over the training set (STE-MM: 10)")
    parser.add_argument("--ste-optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--am-batches", type=int, default=None, help="batches of 500 activation matching records")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: load in the main process)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("lmc-out"), help="folder for checkpoints, JSON and plots")


def torchvision_transforms() -> Any:
    """``torchvision.transforms``, or exit with a message saying how to install torchvision."""
    try:
        from torchvision import transforms
    except ImportError:
        sys.exit("this example needs torchvision (pip install torchvision)")
    return transforms


def torchvision_dataset(name: str, root: str, download: bool, train: bool, transform: Any) -> Dataset:
    """A torchvision dataset, or exit with a message saying how to get it."""
    try:
        from torchvision import datasets
    except ImportError:
        sys.exit(f"this example needs torchvision for {name} (pip install torchvision)")
    try:
        return getattr(datasets, name)(root, train=train, download=download, transform=transform)
    except RuntimeError as error:
        sys.exit(
            f"{name} was not found under --root {root!r} ({error}). Pass --download to let torchvision "
            f"fetch it there, or --root pointing at a folder that holds it."
        )


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
    train_set: Dataset,
    test_set: Dataset,
    optimizer: str = "adam",
    setting: str = "",
    match_set: Dataset | None = None,
) -> dict[str, Any]:
    """Train (or load) models A, B, C and write the full report into ``args.out``.

    Args:
        args: parsed options (see :func:`add_common_arguments`).
        build: makes a fresh model.
        example_input: input for tracing the model.
        train_set: the training set (with augmentation, if any).
        test_set: the test set.
        optimizer: ``"adam"`` (MLPs) or ``"sgd"`` (CNNs).
        setting: one line for the report.
        match_set: the training set without augmentation, for STE, activation matching,
            BatchNorm resets and the train-split barriers (default ``train_set``).
    """
    args.out.mkdir(parents=True, exist_ok=True)
    match_set = match_set if match_set is not None else train_set
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers)
    state_dicts = {}
    for name, seed in zip("ABC", args.seeds):
        path = args.out / f"model_{name}.safetensors"
        if path.exists():
            logger.info("model %s: loading %s", name, path)
            state_dicts[name] = autoperm.load_state_dict(path)
            continue
        logger.info("model %s: training (seed %d, %d epochs)", name, seed, args.epochs)
        torch.manual_seed(seed)
        model = train(build(), train_loader, args.epochs, args.lr, args.device, optimizer)
        autoperm.save_state_dict(model.state_dict(), path)
        state_dicts[name] = model.state_dict()
    template = build()
    spec = infer_spec(template, (example_input,))
    ste_batch = 256 if args.ste_optimizer == "adam" else 1000
    ste_loader = DataLoader(match_set, ste_batch, shuffle=True, num_workers=args.workers, drop_last=True)
    config = DemoConfig(
        num_points=args.points,
        wm_seeds=args.wm_seeds,
        ste_steps=max(1, math.ceil(args.ste_epochs * len(ste_loader))),
        ste_batch_size=ste_batch,
        ste_optimizer=args.ste_optimizer,
        ste_lr=1e-3 if args.ste_optimizer == "adam" else 1e-2,
        ste_select="final" if args.ste_optimizer == "adam" else "best",
        am_batches=args.am_batches,
        seeds=tuple(args.seeds),
    )
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in template.modules())
    evaluation = DataLoader(match_set, 1000, num_workers=args.workers)
    splits = {"train": evaluation, "test": DataLoader(test_set, 1000, num_workers=args.workers)}
    am_loader = DataLoader(match_set, 500, shuffle=True, num_workers=args.workers)
    report = run_experiment(
        spec, template, state_dicts, splits, ste_loader, config, args.out,
        progress=logger.info, reset_bn=evaluation if has_bn else None, device=args.device, setting=setting,
        activation_data=am_loader,
    )
    print(format_report(report))
    return report
