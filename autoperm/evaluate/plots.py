"""Figures of the analyses, written to files with matplotlib's Agg backend (no display needed).

- :func:`plot_interpolation`: loss and accuracy along the path, one line per method and split.
- :func:`plot_singular_values`: singular-value spectra of A and B, one panel per layer.
- :func:`plot_alignment`: the alignment ``R_l`` per layer, one bar per comparison.
- :func:`plot_alignment_spread`: ``R_l`` per layer as mean and std over runs (Ito et al.'s Figure 2).
- :func:`plot_series`: numbers against a budget (e.g. ``R`` against training steps), with std bars.

Each ``plot_*`` function writes the figure its ``*_figure`` twin draws; the twins return the
open :class:`matplotlib.figure.Figure` for callers that show or inspect it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)

from autoperm.evaluate.barrier import InterpolationCurve  # noqa: E402
from autoperm.evaluate.singular import SingularAnalysis  # noqa: E402

__all__ = [
    "alignment_figure",
    "alignment_spread_figure",
    "interpolation_figure",
    "plot_alignment",
    "plot_alignment_spread",
    "plot_interpolation",
    "plot_series",
    "plot_singular_values",
    "series_figure",
    "singular_values_figure",
]

_SPLIT_STYLES = {"train": "--", "test": "-"}


def _save(figure: plt.Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def plot_interpolation(
    curves: Mapping[str, InterpolationCurve],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Write :func:`interpolation_figure` to ``path`` (PNG by its suffix; parent folders are created).

    Returns:
        The path written.
    """
    return _save(interpolation_figure(curves, title), path)


def interpolation_figure(curves: Mapping[str, InterpolationCurve], title: str | None = None) -> plt.Figure:
    """Loss (left) and accuracy (right, when present) against ``t`` for several methods.

    Metrics named ``{split}_loss`` / ``{split}_accuracy`` draw one line per split (test solid,
    train dashed), labelled ``"{method} ({split})"``; a bare ``loss`` draws one line labelled
    with the method. Each method keeps one colour.

    Args:
        curves: method name (``"naive"``, ``"weight matching"``, ...) -> curve.
        title: figure title.

    Returns:
        The figure, still open (close it with ``matplotlib.pyplot.close``).
    """
    kinds = ["loss"] + (["accuracy"] if any(k.endswith("accuracy") for c in curves.values() for k in c.metrics) else [])
    figure, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, kind in enumerate(kinds):
        axis = axes[0][column]
        for index, (method, curve) in enumerate(curves.items()):
            for name, values in curve.metrics.items():
                if not name.endswith(kind):
                    continue
                split = name[: -len(kind)].rstrip("_")
                label = f"{method} ({split})" if split else method
                axis.plot(
                    curve.t, values, _SPLIT_STYLES.get(split, "-"),
                    color=colours[index % len(colours)], marker=".", label=label,
                )
        axis.set_xlabel("t  (0 = model A, 1 = model B)")
        axis.set_ylabel(kind)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def plot_singular_values(
    analysis: SingularAnalysis,
    path: str | os.PathLike[str],
    labels: Sequence[str] = ("A", "B"),
) -> Path:
    """Write :func:`singular_values_figure` to ``path`` (parent folders are created); returns the path."""
    return _save(singular_values_figure(analysis, labels), path)


def singular_values_figure(analysis: SingularAnalysis, labels: Sequence[str] = ("A", "B")) -> plt.Figure:
    """The singular-value spectra of A and B per layer (log scale), with the ``gamma`` cut dotted.

    Identical curves for B before and after a permutation illustrate finding 2 of Ito et al.

    Args:
        analysis: the comparison whose layers are drawn, one panel each.
        labels: the legend names of A and B.

    Returns:
        The figure, still open.
    """
    layers = analysis.layers
    columns = min(len(layers), 4) or 1
    rows = max(1, -(-len(layers) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for index, layer in enumerate(layers):
        axis = axes[index // columns][index % columns]
        axis.semilogy(layer.singular_values_a, label=labels[0])
        axis.semilogy(layer.singular_values_b, "--", label=labels[1])
        if layer.singular_values_a:
            axis.axhline(analysis.gamma * layer.singular_values_a[0], color="grey", lw=0.8, ls=":")
        axis.set_title(f"{layer.name}  R={layer.alignment:.2f}", fontsize=9)
        axis.set_xlabel("index")
        axis.legend(fontsize=8)
    for index in range(len(layers), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(f"singular values (dotted: gamma = {analysis.gamma} x s_max of {labels[0]})")
    return figure


def plot_alignment(analyses: Mapping[str, SingularAnalysis], path: str | os.PathLike[str]) -> Path:
    """Write :func:`alignment_figure` to ``path`` (parent folders are created); returns the path."""
    return _save(alignment_figure(analyses), path)


def alignment_figure(analyses: Mapping[str, SingularAnalysis]) -> plt.Figure:
    """Bar chart of ``R_l`` per layer for several comparisons (e.g. before / after WM / after STE).

    Args:
        analyses: legend name -> comparison; every comparison has the same layers.

    Returns:
        The figure, still open; one bar container per comparison, labelled with its pooled ``R``.
    """
    names = [layer.name for layer in next(iter(analyses.values())).layers] if analyses else []
    width = 0.8 / max(1, len(analyses))
    figure, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 4))
    for index, (label, analysis) in enumerate(analyses.items()):
        values = [layer.alignment for layer in analysis.layers]
        positions = [i + (index - (len(analyses) - 1) / 2) * width for i in range(len(values))]
        axis.bar(positions, values, width, label=f"{label} (R={analysis.alignment:.2f})")
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("alignment R_l")
    axis.axhline(0, color="black", lw=0.6)
    axis.legend(fontsize=8)
    axis.set_title(f"singular-vector alignment (gamma = {next(iter(analyses.values())).gamma})" if analyses else "")
    return figure


Spread = Mapping[str, tuple[float, float]]
"""Name (a layer, a budget) -> ``(mean, std)``."""


def plot_alignment_spread(
    panels: Mapping[str, Mapping[str, Spread]], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Write :func:`alignment_spread_figure` to ``path`` (parent folders are created); returns the path."""
    return _save(alignment_spread_figure(panels, title), path)


def alignment_spread_figure(panels: Mapping[str, Mapping[str, Spread]], title: str | None = None) -> plt.Figure:
    """``R_l`` per layer as bars of the mean with std error bars, one panel per threshold.

    Args:
        panels: panel title (e.g. ``"gamma = 0.3"``) -> series label (e.g. ``"after weight
            matching"``) -> layer -> ``(mean, std)``; every series has the same layers.
        title: figure title.

    Returns:
        The figure, still open; each panel has one labelled bar container per series.
    """
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    for axis, (panel, series) in zip(axes[0], panels.items()):
        names = list(next(iter(series.values())))
        width = 0.8 / max(1, len(series))
        for index, (label, values) in enumerate(series.items()):
            positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(names))]
            means = [values[name][0] for name in names]
            spreads = [values[name][1] for name in names]
            axis.bar(positions, means, width, yerr=spreads, capsize=3, label=label)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("alignment R_l")
        axis.set_title(panel)
        axis.axhline(0, color="black", lw=0.6)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def plot_series(
    panels: Mapping[str, Mapping[str, Spread]],
    path: str | os.PathLike[str],
    xlabel: Mapping[str, str] | None = None,
    ylabel: str = "",
    title: str | None = None,
) -> Path:
    """Write :func:`series_figure` to ``path`` (parent folders are created); returns the path."""
    return _save(series_figure(panels, xlabel, ylabel, title), path)


def series_figure(
    panels: Mapping[str, Mapping[str, Mapping[float, tuple[float, float]]]],
    xlabel: Mapping[str, str] | None = None,
    ylabel: str = "",
    title: str | None = None,
) -> plt.Figure:
    """Numbers against a budget, one line with std error bars per series, one panel per study.

    Args:
        panels: panel title -> series label -> x value (e.g. training steps) -> ``(mean, std)``.
        xlabel: the x-axis label of each panel, by panel title.
        ylabel: the y-axis label of every panel.
        title: figure title.

    Returns:
        The figure, still open; x axes are logarithmic.
    """
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False)
    for axis, (panel, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            xs = sorted(points)
            axis.errorbar(xs, [points[x][0] for x in xs], yerr=[points[x][1] for x in xs], marker="o", capsize=3,
                          label=label)
        axis.set_xscale("log")
        axis.set_xlabel((xlabel or {}).get(panel, ""))
        axis.set_ylabel(ylabel)
        axis.set_title(panel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure
