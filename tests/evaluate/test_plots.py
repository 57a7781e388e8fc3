"""The figures draw the curves, spectra and bars they are given, labelled, and the files hold them."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch
from matplotlib import pyplot as plt
from matplotlib.container import BarContainer

from autoperm.evaluate import InterpolationCurve, singular_analysis
from autoperm.evaluate.plots import (
    alignment_figure,
    alignment_spread_figure,
    interpolation_figure,
    plot_alignment,
    plot_interpolation,
    plot_singular_values,
    series_figure,
    singular_values_figure,
)

T = (0.0, 0.5, 1.0)
NAIVE = InterpolationCurve(T, {"train_loss": (0.1, 2.0, 0.1), "test_loss": (0.2, 2.1, 0.2),
                               "train_accuracy": (1.0, 0.3, 1.0), "test_accuracy": (0.9, 0.3, 0.9)})
MATCHED = InterpolationCurve(T, {"train_loss": (0.1, 0.2, 0.1), "test_loss": (0.2, 0.3, 0.2),
                                 "train_accuracy": (1.0, 0.95, 1.0), "test_accuracy": (0.9, 0.85, 0.9)})


@pytest.fixture
def close_figures():
    yield
    plt.close("all")


def lines_by_label(axis) -> dict[str, tuple[list[float], list[float], str]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
            for line in axis.get_lines()}


def test_interpolation_figure_draws_each_method_and_split(close_figures):
    figure = interpolation_figure({"naive": NAIVE, "weight matching": MATCHED}, title="A -> B")
    loss_axis, accuracy_axis = figure.axes
    assert loss_axis.get_ylabel() == "loss" and accuracy_axis.get_ylabel() == "accuracy"
    assert any(text.get_text() == "A -> B" for text in figure.texts)  # the suptitle
    loss_lines = lines_by_label(loss_axis)
    assert set(loss_lines) == {"naive (train)", "naive (test)", "weight matching (train)", "weight matching (test)"}
    assert loss_lines["naive (test)"] == (list(T), [0.2, 2.1, 0.2], "-")  # test solid
    assert loss_lines["weight matching (train)"] == (list(T), [0.1, 0.2, 0.1], "--")  # train dashed
    assert lines_by_label(accuracy_axis)["weight matching (test)"][1] == [0.9, 0.85, 0.9]
    colours = {line.get_label(): line.get_color() for line in loss_axis.get_lines()}
    assert colours["naive (train)"] == colours["naive (test)"] != colours["weight matching (test)"]
    legend = {text.get_text() for text in loss_axis.get_legend().get_texts()}
    assert legend == set(loss_lines)


def test_interpolation_figure_with_a_bare_loss_has_one_panel_and_line(close_figures):
    figure = interpolation_figure({"m": InterpolationCurve(T, {"loss": (1.0, 2.0, 1.0)})})
    (axis,) = figure.axes
    assert lines_by_label(axis) == {"m": (list(T), [1.0, 2.0, 1.0], "-")}


def test_singular_values_figure_has_both_spectra_and_the_gamma_cut_per_layer(close_figures):
    generator = torch.Generator().manual_seed(0)
    sd_a = {f"w{i}": torch.randn(16, 8, generator=generator) for i in range(5)}
    sd_b = {f"w{i}": torch.randn(16, 8, generator=generator) for i in range(5)}
    analysis = singular_analysis(None, sd_a, sd_b, gamma=0.3)
    figure = singular_values_figure(analysis, ("A", "B (WM)"))
    panels = [axis for axis in figure.axes if axis.axison]
    assert len(panels) == 5
    for axis, layer in zip(panels, analysis.layers):
        lines = lines_by_label(axis)
        assert lines["A"][1] == pytest.approx(layer.singular_values_a)
        assert lines["B (WM)"][1] == pytest.approx(layer.singular_values_b)
        cut = [line for line in axis.get_lines() if line.get_label().startswith("_")]  # the unlabelled gamma line
        assert cut and cut[0].get_ydata()[0] == pytest.approx(0.3 * layer.singular_values_a[0])
        assert axis.get_title().startswith(layer.name) and f"R={layer.alignment:.2f}" in axis.get_title()


def test_alignment_figure_has_one_bar_per_layer_and_comparison(close_figures):
    generator = torch.Generator().manual_seed(0)
    sd_a = {f"w{i}": torch.randn(16, 8, generator=generator) for i in range(3)}
    sd_b = {f"w{i}": torch.randn(16, 8, generator=generator) for i in range(3)}
    different, identical = singular_analysis(None, sd_a, sd_b), singular_analysis(None, sd_a, sd_a)
    figure = alignment_figure({"random": different, "identical": identical})
    (axis,) = figure.axes
    bars = {container.get_label(): [bar.get_height() for bar in container] for container in axis.containers}
    assert bars == {
        f"random (R={different.alignment:.2f})": pytest.approx([layer.alignment for layer in different.layers]),
        f"identical (R={identical.alignment:.2f})": pytest.approx([1.0, 1.0, 1.0]),
    }
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["w0", "w1", "w2"]


def test_plot_functions_write_readable_images(tmp_path):
    path = plot_interpolation({"naive": NAIVE}, tmp_path / "sub" / "curve.png", title="x")
    height, width, _ = matplotlib.image.imread(path).shape
    assert path.parent.name == "sub" and width > height > 100  # two panels side by side
    analysis = singular_analysis(None, {"w": torch.eye(4)}, {"w": torch.eye(4)})
    assert matplotlib.image.imread(plot_singular_values(analysis, tmp_path / "s.png")).ndim == 3
    assert matplotlib.image.imread(plot_alignment({"same": analysis}, tmp_path / "r.png")).ndim == 3
    assert plt.get_fignums() == []  # the plot functions close what they draw


def test_alignment_spread_figure_has_mean_bars_with_std_errors_per_panel(close_figures):
    panels = {
        "gamma = 0": {"without permutation": {"l0": (0.01, 0.0), "l1": (0.02, 0.01)},
                      "after weight matching": {"l0": (0.2, 0.05), "l1": (0.3, 0.02)}},
        "gamma = 0.3": {"without permutation": {"l0": (0.0, 0.0), "l1": (0.05, 0.0)},
                        "after weight matching": {"l0": (0.4, 0.1), "l1": (0.5, 0.0)}},
    }
    figure = alignment_spread_figure(panels, title="R per layer")
    assert [axis.get_title() for axis in figure.axes] == ["gamma = 0", "gamma = 0.3"]
    for axis, series in zip(figure.axes, panels.values()):
        bars = {container.get_label(): [bar.get_height() for bar in container] for container in axis.containers
                if isinstance(container, BarContainer)}
        assert bars == {label: [mean for mean, _ in values.values()] for label, values in series.items()}
        assert [tick.get_text() for tick in axis.get_xticklabels()] == ["l0", "l1"]
    errors = [container.errorbar for container in figure.axes[0].containers if isinstance(container, BarContainer)]
    assert all(error is not None and error.has_yerr for error in errors)  # std error bars on every series


def test_series_figure_draws_a_line_per_series_against_a_log_axis(close_figures):
    panels = {"budget": {"after WM": {40.0: (0.1, 0.01), 600.0: (0.14, 0.02), 3200.0: (0.36, 0.03)},
                         "naive": {600.0: (0.0, 0.0), 40.0: (0.002, 0.001)}}}
    figure = series_figure(panels, xlabel={"budget": "steps"}, ylabel="R")
    (axis,) = figure.axes
    assert axis.get_xscale() == "log" and axis.get_xlabel() == "steps" and axis.get_ylabel() == "R"
    lines = {container.get_label(): (list(container.lines[0].get_xdata()), list(container.lines[0].get_ydata()))
             for container in axis.containers}
    assert lines == {"after WM": ([40.0, 600.0, 3200.0], [0.1, 0.14, 0.36]), "naive": ([40.0, 600.0], [0.002, 0.0])}
