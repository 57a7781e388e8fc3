"""Ito et al.'s analysis (arXiv 2402.04051) of three trained models, step by step.

:func:`run_experiment` takes models A, B and C and runs the steps its report prints:

1. evaluate A, B and C (once; every later table reuses these numbers);
2. align B to A by weight matching (several seeds, its group order is random), activation
   matching and the straight-through estimator (STE) of Git Re-Basin (arXiv 2209.04836);
3. section 1: barriers between A and B (train / test, loss / accuracy), the L2 distance and its
   reduction, the singular-vector alignment ``R`` (pooled over layers, as the paper defines it)
   at ``gamma`` 0 and 0.3 and per layer, the invariance of singular values under permutation;
   weight matching over its seeds as mean and std;
4. section 2: the anchor scheme (B and C each aligned to A by WM and by STE, then the barrier
   and ``R`` between the two aligned models) and MergeMany;
5. the plots, section 3 (which findings reproduced, :mod:`autoperm.demo_report`) and
   ``report.json``, written once.

:class:`DemoConfig` holds the settings of this analysis and of the demo's training.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoperm.api import activation_matching
from autoperm.data import Data, iter_batches
from autoperm.demo_report import findings
from autoperm.evaluate import (
    InterpolationCurve,
    SingularAnalysis,
    barrier_summary,
    evaluate_model,
    interpolation_curve,
    l2_distance,
    reset_bn_stats,
    singular_analyses,
)
from autoperm.evaluate.plots import plot_alignment_spread
from autoperm.solvers import (
    MatchingResult,
    SteResult,
    mean_state_dict,
    merge_many,
    ste_matching,
    weight_matching,
)
from autoperm.io import write_text_atomic
from autoperm.spec import PermutationSpec, apply_permutation

__all__ = ["DemoConfig", "Progress", "alignment_spread", "alignment_spread_panels", "run_experiment", "say"]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Called with one line of text per step."""
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo and of :func:`run_experiment`; :meth:`quick` is the CI-sized variant.

    Each default follows the literature where the budget allows, and says so:

    Attributes:
        epochs: training epochs per model: 60 passes over digits' 1,437 training samples (about
            700 Adam steps of batch 128), enough for 100% train accuracy; the MLPs of Git Re-Basin
            and Ito et al. train to convergence on MNIST the same way.
        hidden: width of the hidden layers. The literature's MLP is 3 x 512; on the 2-core CPU
            the demo targets, STE's per-step projection (three LAPs of ``hidden x hidden``)
            does not fit the literature's step budget at 512 within about two minutes, so the
            demo uses 256 (``--hidden 512`` runs the paper's width, more slowly).
        depth: hidden layers (3, as in the literature).
        batch_size: training batch size (128).
        lr: Adam learning rate for training (1e-3, as in the literature).
        precision: training precision, ``"float32"`` or ``"bf16-mixed"`` (bfloat16 autocast with
            float32 weights, as Ito et al.'s follow-up code e5-a/STE-MM trains); see
            :func:`autoperm.demo.train_classifier`. Evaluation is always in float32.
        num_points: points on each interpolation curve (25, Git Re-Basin's).
        wm_seeds: weight-matching runs with different group orders; Ito et al. report the mean
            and standard deviation of 5 (their Figure 2).
        ste_steps: STE optimiser steps. The follow-up code of Ito et al. (e5-a/STE-MM) runs Adam
            lr 1e-3, batch 256 for 10 epochs of MNIST, about 2,300 steps; the demo runs the same
            number of steps (about 400 passes over digits).
        ste_lr: STE learning rate (STE-MM's Adam 1e-3).
        ste_batch_size: STE batch size (STE-MM's 256).
        ste_optimizer: ``"adam"`` (STE-MM) or ``"sgd"`` (Git Re-Basin: momentum 0.9, lr 1e-2).
        ste_select: ``"final"`` projection (STE-MM) or ``"best"`` batch loss (Git Re-Basin).
        am_batch_size: batch size of activation matching's recorded activations (tensor data).
        am_batches: the most batches activation matching records (``None``: all of the training
            data, as Git Re-Basin does; conv nets on CIFAR-10 need a limit for memory).
        gammas: singular-value thresholds of ``R`` (0 and 0.3, the paper's).
        seeds: seeds of models A, B and C.
    """

    epochs: int = 60
    hidden: int = 256
    depth: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    precision: str = "float32"
    num_points: int = 25
    wm_seeds: int = 5
    ste_steps: int = 2300
    ste_lr: float = 1e-3
    ste_batch_size: int = 256
    ste_optimizer: str = "adam"
    ste_select: str = "final"
    am_batch_size: int = 500
    am_batches: int | None = None
    gammas: tuple[float, ...] = (0.0, 0.3)
    seeds: tuple[int, int, int] = (0, 1, 2)

    @classmethod
    def quick(cls) -> DemoConfig:
        """Narrow models, few epochs, points and steps: every section present, in seconds."""
        return cls(epochs=6, hidden=64, num_points=5, wm_seeds=2, ste_steps=40)

    @classmethod
    def paper(cls) -> DemoConfig:
        """Ito et al.'s MLP setting with the authors' recipe, for MNIST digits.

        784-512-512-512-10 trained with Adam 1e-3 for 5 epochs at batch 500 without weight
        decay (their follow-up code, e5-a/STE-MM ``scripts/run_train.sh``); STE at its
        literature budget (Adam 1e-3, batch 256, 2,300 steps); WM over 5 seeds; 25 points.
        """
        return cls(epochs=5, hidden=512, batch_size=500)


def say(progress: Progress | None, message: str) -> None:
    """Log ``message`` at INFO and hand it to ``progress``, when there is one."""
    logger.info(message)
    if progress is not None:
        progress(message)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _gamma_key(gamma: float) -> str:
    return f"gamma={gamma:g}"


def _alignment(analyses: Mapping[float, SingularAnalysis], attribute: str = "alignment") -> dict[str, float]:
    return {_gamma_key(g): getattr(a, attribute) for g, a in analyses.items()}


def _alignment_per_layer(analyses: Mapping[float, SingularAnalysis]) -> dict[str, dict[str, float]]:
    return {_gamma_key(g): {layer.name: layer.alignment for layer in a.layers} for g, a in analyses.items()}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


@dataclass(frozen=True)
class _Experiment:
    """What every step of :func:`run_experiment` measures with: the spec, the data and the settings."""

    spec: PermutationSpec
    template: nn.Module
    splits: Mapping[str, Data]
    train_data: Data
    config: DemoConfig
    reset_bn: Data | None
    device: str | torch.device
    progress: Progress | None

    def metrics(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Loss and accuracy of one model on every split, e.g. ``{"test_loss": ..., ...}``."""
        model = copy.deepcopy(self.template).to(self.device)
        model.load_state_dict(state_dict)
        if self.reset_bn is not None:
            reset_bn_stats(model, self.reset_bn, device=self.device)
        return {
            f"{split}_{key}": value
            for split, data in self.splits.items()
            for key, value in evaluate_model(model, data, device=self.device).items()
        }

    def curve(self, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> InterpolationCurve:
        """Loss and accuracy along the straight line from ``first`` to ``second``."""
        return interpolation_curve(
            self.template, first, second, self.splits, num_points=self.config.num_points, reset_bn=self.reset_bn,
            device=self.device,
        )

    def analyse(
        self, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], check: bool = False
    ) -> dict[float, SingularAnalysis]:
        """``R`` at every ``gamma`` of the config; ``check`` also measures singular-value invariance."""
        return singular_analyses(self.spec if check else None, first, second, gammas=self.config.gammas)

    def ste(
        self, anchor: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
        start: Mapping[str, torch.Tensor], name: str,
    ) -> SteResult:
        """STE aligning ``other`` to ``anchor`` from the permutations ``start``, with progress four times."""
        config = self.config
        per_epoch = max(1, sum(1 for _ in iter_batches(self.train_data, config.ste_batch_size)))
        every = max(1, -(-config.ste_steps // per_epoch) // 4)

        def on_epoch(epoch: int, loss: float) -> None:
            if epoch % every == 0:
                say(self.progress, f"  STE {name}: epoch {epoch}, mean midpoint batch loss {loss:.4f}")

        result = ste_matching(
            self.spec, self.template, anchor, other, self.train_data, steps=config.ste_steps, lr=config.ste_lr,
            batch_size=config.ste_batch_size, optimizer=config.ste_optimizer,  # type: ignore[arg-type]
            select=config.ste_select,  # type: ignore[arg-type]
            init_perms=start, device=self.device, callback=on_epoch,
        )
        say(
            self.progress,
            f"  STE {name}: {result.steps} steps in {result.seconds:.1f} s ({result.steps_per_second:.0f} steps/s)",
        )
        return result


@dataclass(frozen=True)
class _Alignments:
    """B aligned to A by every method, and what the later steps reuse."""

    perms: dict[str, Mapping[str, torch.Tensor]]
    weight_matching_runs: list[MatchingResult]
    activation_matching: MatchingResult
    ste: SteResult
    aligned: dict[str, Mapping[str, torch.Tensor]]


def run_experiment(
    spec: PermutationSpec,
    template: nn.Module,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    splits: Mapping[str, Data],
    train_data: Data,
    config: DemoConfig,
    out_dir: str | Path,
    progress: Progress | None = None,
    reset_bn: Data | None = None,
    device: str | torch.device = "cpu",
    setting: str = "",
    activation_data: Data | None = None,
    training_seconds: float | None = None,
) -> dict[str, Any]:
    """Ito et al.'s analysis of three trained models A, B, C; writes ``report.json`` and plots.

    The steps follow the printed report: evaluate A, B and C once; align B to A by every method
    (section 1: barriers, distances, ``R``, weight matching over seeds, STE); the anchor scheme
    and MergeMany (section 2); the plots; the findings (section 3); ``report.json``.

    Args:
        spec: the permutation spec of the architecture.
        template: a module of the architecture (its weights are not used).
        state_dicts: ``{"A": ..., "B": ..., "C": ...}``.
        splits: named evaluation data, e.g. ``{"train": ..., "test": ...}``.
        train_data: data for STE and activation matching (and BatchNorm resets), in any form
            :func:`autoperm.data.iter_batches` accepts.
        config: the settings (training fields are not used here).
        out_dir: output folder (created).
        progress: called with one line of text per step.
        reset_bn: data to recompute BatchNorm statistics of every evaluated model on (models
            with BatchNorm); ``None`` for models without.
        device: where solvers and evaluation run.
        setting: a line describing the models and data, kept in the report.
        activation_data: data for activation matching (default ``train_data``).
        training_seconds: how long training A, B and C took, kept in ``seconds`` and counted in
            its ``total``; ``None`` when the models were not trained by the caller.

    Returns:
        The report: ``setting``, ``config``, ``models``, ``pair`` (A vs B for every method),
        ``weight_matching_seeds``, ``ste``, ``anchor``, ``merge``, ``files``, ``seconds``,
        ``findings``. Barriers are ``{metric: {"mean", "linear"}}``; ``R`` values are keyed
        ``"gamma=0"`` and ``"gamma=0.3"``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    experiment = _Experiment(spec, template, splits, train_data, config, reset_bn, device, progress)
    sd_a, sd_b, sd_c = (dict(state_dicts[name]) for name in ("A", "B", "C"))
    seconds: dict[str, float] = {}

    say(progress, "evaluating models A, B and C")
    models = {name: experiment.metrics(sd) for name, sd in zip("ABC", (sd_a, sd_b, sd_c))}
    alignments = _align_pair(
        experiment, sd_a, sd_b, activation_data if activation_data is not None else train_data, seconds
    )
    pair, curves, analyses = _pair_section(experiment, sd_a, sd_b, alignments)
    weight_matching_seeds = _weight_matching_seeds(experiment, sd_a, sd_b, alignments, pair)
    anchor, anchor_curves = _anchor_section(experiment, sd_a, sd_c, alignments)
    merge = _merge_section(experiment, (sd_a, sd_b, sd_c), models, seconds)
    say(progress, f"writing the report and plots to {out}")
    files = _write_plots(out, curves, anchor_curves, analyses, config.gammas[-1])
    files["alignment_per_layer"] = plot_alignment_spread(
        alignment_spread_panels(alignment_spread([(pair, weight_matching_seeds)])), out / "alignment_per_layer.png",
        f"R per layer: without permutation and after WM (mean +- std over {config.wm_seeds} seeds)",
    )
    seconds["analysis"] = seconds["total"] = time.perf_counter() - started
    if training_seconds is not None:
        seconds["total"] += training_seconds
        seconds["training"] = training_seconds
    report: dict[str, Any] = {
        "setting": setting,
        "config": {**asdict(config), "seeds": list(config.seeds), "gammas": list(config.gammas)},
        "models": models,
        "pair": pair,
        "weight_matching_seeds": weight_matching_seeds,
        "ste": _ste_summary(alignments.ste, alignments.perms["weight_matching"], config),
        "anchor": anchor,
        "merge": merge,
        "files": {key: str(path) for key, path in {**files, "report": out / "report.json"}.items()},
        "seconds": seconds,
    }
    report["findings"] = findings(report)
    if not _finite(report):
        logger.warning("the report holds non-finite numbers")
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    return report


def _align_pair(
    experiment: _Experiment,
    sd_a: StateDict,
    sd_b: StateDict,
    activation_data: Data,
    seconds: dict[str, float],
) -> _Alignments:
    """Align B to A by weight matching (every seed), activation matching and STE (from WM's answer).

    Adds the solvers' times to ``seconds``; WM's is the mean over its seeds.
    """
    config, progress, device, spec = experiment.config, experiment.progress, experiment.device, experiment.spec
    say(progress, f"aligning B to A by weight matching ({config.wm_seeds} seeds)")
    clock = time.perf_counter()
    wm_runs = [weight_matching(spec, sd_a, sd_b, seed=seed, device=device) for seed in range(config.wm_seeds)]
    seconds["weight_matching"] = (time.perf_counter() - clock) / config.wm_seeds
    say(progress, "aligning B to A by activation matching")
    clock = time.perf_counter()
    am = activation_matching(
        spec, experiment.template, sd_a, sd_b, activation_data,
        batch_size=config.am_batch_size, max_batches=config.am_batches, device=device,
    )
    seconds["activation_matching"] = time.perf_counter() - clock
    say(progress, f"aligning B to A by STE ({config.ste_steps} {config.ste_optimizer} steps, lr {config.ste_lr:g})")
    ste = experiment.ste(sd_a, sd_b, wm_runs[0].perms, "B->A")
    seconds["ste"] = ste.seconds
    perms = {"weight_matching": wm_runs[0].perms, "activation_matching": am.perms, "ste": ste.perms}
    aligned = {"naive": sd_b, **{method: apply_permutation(spec, p, sd_b) for method, p in perms.items()}}
    return _Alignments(perms, wm_runs, am, ste, aligned)


def _pair_section(
    experiment: _Experiment, sd_a: StateDict, sd_b: StateDict, alignments: _Alignments
) -> tuple[dict[str, Any], dict[str, InterpolationCurve], dict[str, dict[float, SingularAnalysis]]]:
    """Section 1 of the report: A against B, naive and aligned by each method.

    Returns:
        The ``pair`` section, and the curves and analyses by method (for the plots).
    """
    say(experiment.progress, "interpolating A -> B and measuring distances and singular vectors")
    aligned = alignments.aligned
    curves = {method: experiment.curve(sd_a, b) for method, b in aligned.items()}
    analyses = {method: experiment.analyse(sd_a, b, check=method == "naive") for method, b in aligned.items()}
    distances = {method: l2_distance(sd_a, b) for method, b in aligned.items()}
    pair = {
        "barriers": {method: barrier_summary(c) for method, c in curves.items()},
        "curves": {method: c.to_dict() for method, c in curves.items()},
        "l2_distance": {method: d.to_dict() for method, d in distances.items()},
        "l2_reduction": {
            method: 1.0 - distances[method].absolute / distances["naive"].absolute for method in alignments.perms
        },
        "alignment": {method: _alignment(a) for method, a in analyses.items()},
        "alignment_mean_over_layers": {method: _alignment(a, "mean_layer_alignment") for method, a in analyses.items()},
        "alignment_per_layer": {method: _alignment_per_layer(a) for method, a in analyses.items()},
        "singular_value_invariance_error": max(a.invariance_error or 0.0 for a in analyses["naive"].values()),
        "weight_matching_sweeps": alignments.weight_matching_runs[0].n_iter,
        "activation_matching_fallback_groups": list(alignments.activation_matching.fallback_groups),
    }
    return pair, curves, analyses


def _weight_matching_seeds(
    experiment: _Experiment, sd_a: StateDict, sd_b: StateDict, alignments: _Alignments, pair: Mapping[str, Any]
) -> dict[str, Any]:
    """Barriers, L2 reduction and ``R`` of every weight-matching seed, and their mean and std.

    Seed 0 is the run of section 1: its numbers are taken from ``pair``, not measured again.
    ``alignment_per_layer`` gives each layer's ``R_l`` per seed, their mean and std, and the
    naive ``R_l`` (without the permutation), as Figure 2 of Ito et al. shows them.
    """
    say(experiment.progress, "evaluating the other weight-matching seeds")
    naive_distance = pair["l2_distance"]["naive"]["absolute"]
    rows, per_layer = [], []
    for seed, run in enumerate(alignments.weight_matching_runs):
        if seed == 0:
            summary = pair["barriers"]["weight_matching"]
            reduction = pair["l2_reduction"]["weight_matching"]
            alignment = pair["alignment"]["weight_matching"]
            per_layer.append(pair["alignment_per_layer"]["weight_matching"])
        else:
            b = apply_permutation(experiment.spec, run.perms, sd_b)
            summary = barrier_summary(experiment.curve(sd_a, b))
            reduction = 1.0 - l2_distance(sd_a, b).absolute / naive_distance
            analyses = experiment.analyse(sd_a, b)
            alignment = _alignment(analyses)
            per_layer.append(_alignment_per_layer(analyses))
        rows.append({
            "seed": seed,
            "test_loss_barrier": summary["test_loss"]["mean"],
            "train_loss_barrier": summary["train_loss"]["mean"],
            "test_accuracy_barrier": summary["test_accuracy"]["mean"],
            "l2_reduction": reduction,
            "sweeps": run.n_iter,
            **{f"R {key}": value for key, value in alignment.items()},
        })
    keys = [key for key in rows[0] if key != "seed"]
    naive = pair["alignment_per_layer"]["naive"]
    layers = {
        gamma: {
            layer: {
                "naive": value,
                "runs": [seed_values[gamma][layer] for seed_values in per_layer],
                **_mean_std([seed_values[gamma][layer] for seed_values in per_layer]),
            }
            for layer, value in by_layer.items()
        }
        for gamma, by_layer in naive.items()
    }
    return {"runs": rows, **{key: _mean_std([row[key] for row in rows]) for key in keys}, "alignment_per_layer": layers}


def alignment_spread(
    results: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Each layer's ``R_l`` without the permutation and after WM, mean and std over runs and seeds.

    Args:
        results: one ``(pair, weight_matching_seeds)`` per trained pair of models (report
            sections of :func:`run_experiment`).

    Returns:
        ``{gamma: {layer: {"naive": {"mean", "std"}, "weight_matching": {"mean", "std"}}}}``: the
        naive ``R_l`` over the pairs, the aligned one over every weight-matching seed of every pair.
    """
    first = results[0][0]["alignment_per_layer"]["naive"]
    return {
        gamma: {
            layer: {
                "naive": _mean_std([pair["alignment_per_layer"]["naive"][gamma][layer] for pair, _ in results]),
                "weight_matching": _mean_std([
                    value for _, seeds in results for value in seeds["alignment_per_layer"][gamma][layer]["runs"]
                ]),
            }
            for layer in layers
        }
        for gamma, layers in first.items()
    }


def alignment_spread_panels(
    spread: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """:func:`alignment_spread` as the panels of :func:`autoperm.evaluate.plots.alignment_spread_figure`."""
    labels = {"naive": "without permutation", "weight_matching": "after weight matching"}
    return {
        gamma.replace("=", " = "): {
            label: {layer: (values[method]["mean"], values[method]["std"]) for layer, values in layers.items()}
            for method, label in labels.items()
        }
        for gamma, layers in spread.items()
    }


def _anchor_section(
    experiment: _Experiment, sd_a: StateDict, sd_c: StateDict, alignments: _Alignments
) -> tuple[dict[str, Any], dict[str, InterpolationCurve]]:
    """Section 2, the anchor scheme: C aligned to A by WM and STE, then B against C.

    Returns:
        The ``anchor`` section, and the B -> C curves by method (for the plot).
    """
    say(experiment.progress, "aligning C to anchor A (weight matching, STE)")
    spec = experiment.spec
    wm_c = weight_matching(spec, sd_a, sd_c, device=experiment.device)
    ste_c = experiment.ste(sd_a, sd_c, wm_c.perms, "C->A")
    anchored = {
        "naive": (alignments.aligned["naive"], sd_c),
        "weight_matching": (alignments.aligned["weight_matching"], apply_permutation(spec, wm_c.perms, sd_c)),
        "ste": (alignments.aligned["ste"], apply_permutation(spec, ste_c.perms, sd_c)),
    }
    say(experiment.progress, "interpolating between the aligned B and C")
    curves = {method: experiment.curve(b, c) for method, (b, c) in anchored.items()}
    anchor = {
        "barriers_b_to_c": {method: barrier_summary(c) for method, c in curves.items()},
        "curves_b_to_c": {method: c.to_dict() for method, c in curves.items()},
        "alignment_b_to_c": {method: _alignment(experiment.analyse(b, c)) for method, (b, c) in anchored.items()},
        "ste_c": _ste_summary(ste_c, wm_c.perms, experiment.config),
    }
    return anchor, curves


def _merge_section(
    experiment: _Experiment,
    state_dicts: tuple[StateDict, StateDict, StateDict],
    models: Mapping[str, dict[str, float]],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Section 2, MergeMany: the merged model and the naive average against A, B and C (``models``)."""
    say(experiment.progress, "merging A, B and C with MergeMany")
    spec = experiment.spec
    clock = time.perf_counter()
    merged = merge_many(spec, list(state_dicts), method="wm", device=experiment.device)
    seconds["merge_many"] = time.perf_counter() - clock
    permuted = [apply_permutation(spec, p, sd) for p, sd in zip(merged.perms, state_dicts)]
    return {
        "individual": dict(models),
        "merged": experiment.metrics(merged.state_dict),
        "naive_average": experiment.metrics(mean_state_dict(state_dicts)),
        "alignment_to_models": {
            name: _alignment(experiment.analyse(merged.state_dict, sd)) for name, sd in zip("ABC", permuted)
        },
        "rounds": merged.n_iter,
    }


def _write_plots(
    out: Path,
    curves: Mapping[str, InterpolationCurve],
    anchor_curves: Mapping[str, InterpolationCurve],
    analyses: Mapping[str, Mapping[float, SingularAnalysis]],
    headline: float,
) -> dict[str, Path]:
    """The four figures of the report, by key: interpolation A -> B and B -> C, spectra, ``R`` per layer."""
    from autoperm.evaluate.plots import (
        plot_alignment,
        plot_interpolation,
        plot_singular_values,
    )

    def labelled(by_method: Mapping[str, Any]) -> dict[str, Any]:
        return {method.replace("_", " "): value for method, value in by_method.items()}

    return {
        "curves": plot_interpolation(labelled(curves), out / "interpolation.png", "A -> B"),
        "anchor_curves": plot_interpolation(
            labelled(anchor_curves), out / "anchor_b_to_c.png", "B -> C, both aligned to anchor A"
        ),
        "spectra": plot_singular_values(
            analyses["weight_matching"][headline], out / "singular_values.png", ("A", "B (WM)")
        ),
        "alignment": plot_alignment(
            labelled({method: a[headline] for method, a in analyses.items()}), out / "alignment.png"
        ),
    }


def _ste_summary(result: SteResult, wm_perms: Mapping[str, torch.Tensor], config: DemoConfig) -> dict[str, Any]:
    """How an STE run went: steps, speed, loss trajectory, and how far it moved from WM."""
    moved = sum(int((result.perms[g] != wm_perms[g]).sum()) for g in wm_perms)
    total = sum(int(p.numel()) for p in wm_perms.values())
    window = max(1, len(result.history) // 50)
    trajectory = [
        statistics.fmean(result.history[i:i + window]) for i in range(0, len(result.history), window)
    ]
    return {
        "steps": result.steps,
        "optimizer": config.ste_optimizer,
        "lr": config.ste_lr,
        "batch_size": config.ste_batch_size,
        "selected": result.selected,
        "seconds": result.seconds,
        "steps_per_second": result.steps_per_second,
        "midpoint_loss_start": result.start_loss,
        "midpoint_loss_end": result.loss,
        "batch_loss_trajectory": {"window": window, "values": trajectory},
        "units_moved_from_weight_matching": moved / total if total else 0.0,
        "groups_changed": list(result.changed_groups),
        "projection": result.projection.to_dict(),
    }
