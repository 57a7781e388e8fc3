"""Plots are written as PNG files."""

from __future__ import annotations

import torch

from autoperm.evaluate import InterpolationCurve, singular_analysis
from autoperm.evaluate.plots import plot_alignment, plot_interpolation, plot_singular_values

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_interpolation_plot_writes_png(tmp_path):
    t = (0.0, 0.5, 1.0)
    naive = InterpolationCurve(t, {"train_loss": (0.1, 2.0, 0.1), "test_loss": (0.2, 2.1, 0.2),
                                   "train_accuracy": (1.0, 0.3, 1.0), "test_accuracy": (0.9, 0.3, 0.9)})
    matched = InterpolationCurve(t, {"train_loss": (0.1, 0.2, 0.1), "test_loss": (0.2, 0.3, 0.2),
                                     "train_accuracy": (1.0, 0.95, 1.0), "test_accuracy": (0.9, 0.85, 0.9)})
    path = plot_interpolation({"naive": naive, "weight matching": matched}, tmp_path / "sub" / "curve.png", title="x")
    assert is_png(path)
    loss_only = plot_interpolation({"m": InterpolationCurve(t, {"loss": (1.0, 2.0, 1.0)})}, tmp_path / "l.png")
    assert is_png(loss_only)


def test_spectra_and_alignment_plots_write_png(tmp_path):
    generator = torch.Generator().manual_seed(0)
    sd_a = {f"w{i}": torch.randn(16, 8, generator=generator) for i in range(5)}
    sd_b = {f"w{i}": torch.randn(16, 8, generator=generator) for i in range(5)}
    analysis = singular_analysis(None, sd_a, sd_b)
    assert is_png(plot_singular_values(analysis, tmp_path / "s.png"))
    same = singular_analysis(None, sd_a, sd_a)
    assert is_png(plot_alignment({"before": analysis, "identical": same}, tmp_path / "r.png"))
