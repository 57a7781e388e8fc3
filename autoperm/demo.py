"""The demo: the experiment of Ito et al. (arXiv 2402.04051) on scikit-learn's digits.

:func:`run_demo` trains three MLPs (A, B, C) from different seeds and hands them to
:func:`autoperm.demo_experiment.run_experiment`, which the example scripts use on MNIST,
Fashion-MNIST and CIFAR-10 too: naive interpolation, weight matching (WM), activation matching
(AM) and the straight-through estimator (STE) of Git Re-Basin (arXiv 2209.04836); barriers, the
L2 distance, the singular-vector alignment ``R``, the anchor scheme and MergeMany; which of the
paper's three findings the numbers reproduce. It writes ``report.json`` and PNG plots and
returns the report. Progress goes to ``logging`` and to an optional callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autoperm.data import Data, DigitsData, iter_batches, load_digits
from autoperm.demo_experiment import DemoConfig, Progress, run_experiment, say
from autoperm.demo_report import format_report
from autoperm.infer import infer_spec
from autoperm.models import MLP

__all__ = ["DemoConfig", "format_report", "run_demo", "run_experiment", "train_classifier"]

StateDict = dict[str, torch.Tensor]


def train_classifier(
    model: nn.Module,
    data: DigitsData | Data,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
    name: str = "model",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; returns it in eval mode.

    Args:
        model: the network.
        data: :class:`DigitsData` (its shuffled training split) or any data form of
            :func:`autoperm.data.iter_batches` (a DataLoader shuffles itself).
        epochs, lr, batch_size: Adam settings.
        seed: seeds the digits batch order.
        progress: called with a line of text four times over the run.
        name: how progress calls the model.
        device: where to train.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.to(device).train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        if isinstance(data, DigitsData):
            batches: Any = data.loader("train", batch_size=batch_size, seed=seed * 100_003 + epoch)
        else:
            batches = iter_batches(data, batch_size)
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * targets.shape[0]
            count += targets.shape[0]
        if epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 4) == 0:
            say(progress, f"  {name}: epoch {epoch + 1}/{epochs}, train loss {total / max(count, 1):.4f}")
    model.eval()
    return model


def run_demo(
    out_dir: str | Path = "autoperm-demo",
    quick: bool = False,
    config: DemoConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train three MLPs on digits and run :func:`run_experiment`; write ``report.json`` and plots.

    Args:
        out_dir: output folder (created).
        quick: use :meth:`DemoConfig.quick` (ignored when ``config`` is given).
        config: explicit settings.
        progress: called with one line of text per step (also logged at INFO).

    Returns:
        The report (the content of ``report.json``), see :func:`run_experiment`.

    Example:
        >>> report = run_demo("autoperm-demo", quick=True)
        >>> report["pair"]["alignment"]["weight_matching"]["gamma=0.3"]
    """
    config = config or (DemoConfig.quick() if quick else DemoConfig())
    started = time.perf_counter()
    data = load_digits()
    state_dicts = {
        name: train_model(
            lambda: MLP(data.num_features, config.hidden, config.depth, data.num_classes), data, config, seed, name,
            progress,
        )
        for name, seed in zip(("A", "B", "C"), config.seeds)
    }
    training = time.perf_counter() - started
    template = _seeded(lambda: MLP(data.num_features, config.hidden, config.depth, data.num_classes), config.seeds[0])
    spec = infer_spec(template, (data.train[0][:2],))
    return run_experiment(
        spec, template, state_dicts, data.splits(), data.train, config, out_dir,
        progress=progress, setting="3-layer MLP on scikit-learn digits", training_seconds=training,
    )


def train_model(
    build: Callable[[], nn.Module],
    data: DigitsData,
    config: DemoConfig,
    seed: int,
    name: str,
    progress: Progress | None = None,
) -> StateDict:
    """Build a model from ``seed`` (the caller's global RNG is left as it was) and train it on ``data``.

    Args:
        build: makes a fresh model from the global RNG.
        data: the training data.
        config: ``epochs``, ``lr`` and ``batch_size`` of the training; ``hidden`` for the progress line.
        seed: seeds the initialisation and the batch order.
        name: how progress calls the model.
        progress: called with a line of text at the start and four times over the run.

    Returns:
        A copy of the trained model's state dict.
    """
    say(progress, f"training model {name} (seed {seed}, {config.epochs} epochs, 3 x {config.hidden} MLP)")
    model = train_classifier(
        _seeded(build, seed), data, config.epochs, config.lr, config.batch_size, seed, progress, name
    )
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
        torch.manual_seed(seed)
        return build()


