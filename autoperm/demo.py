"""The demo: the experiment of Ito et al. (arXiv 2402.04051) on scikit-learn's digits.

:func:`run_demo` trains three MLPs (A, B, C) from different seeds and hands them to
:func:`run_experiment`, which the example scripts use on MNIST, Fashion-MNIST and CIFAR-10 too.
For naive interpolation, weight matching (WM), activation matching (AM) and the
straight-through estimator (STE) of Git Re-Basin (arXiv 2209.04836) it measures:

1. the barriers between A and B (train / test, loss / accuracy), the L2 distance and its
   reduction; WM repeated over several seeds (its group order is random) as mean and std;
2. the singular-vector alignment ``R`` (pooled over layers, as the paper defines it) at
   ``gamma`` 0 and 0.3, per layer too, and the invariance of singular values under permutation;
3. the anchor scheme with three models (B and C each aligned to A by WM and by STE, then the
   barrier and ``R`` between the two aligned models), and MergeMany.

It states which of the paper's three findings the numbers reproduce
(:mod:`autoperm.demo_report`), writes ``report.json`` and PNG plots, and returns the report.
Progress goes to ``logging`` and to an optional callback.
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
from torch.nn import functional as F

from autoperm.data import Data, DigitsData, iter_batches, load_digits
from autoperm.demo_report import findings, format_report
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
from autoperm.infer import infer_spec
from autoperm.models import MLP
from autoperm.solvers.ste import SteResult
from autoperm.spec import PermutationSpec, apply_permutation
from autoperm.io import write_text_atomic

__all__ = ["DemoConfig", "run_demo", "run_experiment", "format_report", "train_classifier"]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
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
            _say(progress, f"  {name}: epoch {epoch + 1}/{epochs}, train loss {total / max(count, 1):.4f}")
    model.eval()
    return model


def _say(progress: Progress | None, message: str) -> None:
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


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


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

    def build(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
            torch.manual_seed(seed)
            return MLP(data.num_features, config.hidden, config.depth, data.num_classes)

    state_dicts: dict[str, StateDict] = {}
    for name, seed in zip(("A", "B", "C"), config.seeds):
        _say(progress, f"training model {name} (seed {seed}, {config.epochs} epochs, 3 x {config.hidden} MLP)")
        model = train_classifier(build(seed), data, config.epochs, config.lr, config.batch_size, seed, progress, name)
        state_dicts[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    training = time.perf_counter() - started
    template = build(config.seeds[0])
    spec = infer_spec(template, (data.train[0][:2],))
    report = run_experiment(
        spec, template, state_dicts, data.splits(), data.train, config, out_dir,
        progress=progress, setting="3-layer MLP on scikit-learn digits",
    )
    report["seconds"]["training"] = training
    report["seconds"]["total"] = time.perf_counter() - started
    write_text_atomic(Path(out_dir) / "report.json", json.dumps(report, indent=2))
    return report


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
) -> dict[str, Any]:
    """Ito et al.'s analysis of three trained models A, B, C; writes ``report.json`` and plots.

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

    Returns:
        The report: ``config``, ``setting``, ``models``, ``pair`` (A vs B for every method),
        ``weight_matching_seeds``, ``ste``, ``anchor``, ``merge``, ``findings``, ``files``,
        ``seconds``. Barriers are ``{metric: {"mean", "linear"}}``; ``R`` values are keyed
        ``"gamma=0"`` and ``"gamma=0.3"``.
    """
    from autoperm.evaluate.plots import plot_alignment, plot_interpolation, plot_singular_values
    from autoperm.api import activation_matching
    from autoperm.solvers import merge_many, ste_matching, weight_matching

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    sd_a, sd_b, sd_c = (dict(state_dicts[name]) for name in ("A", "B", "C"))

    def metrics(state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        model = copy.deepcopy(template).to(device)
        model.load_state_dict(state_dict)
        if reset_bn is not None:
            reset_bn_stats(model, reset_bn, device=device)
        return {f"{split}_{k}": v for split, d in splits.items() for k, v in evaluate_model(model, d, device=device).items()}

    def curve(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> InterpolationCurve:
        return interpolation_curve(
            template, first, second, splits, num_points=config.num_points, reset_bn=reset_bn, device=device
        )

    def analyse(
        first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], check: bool = False
    ) -> dict[float, SingularAnalysis]:
        return singular_analyses(spec if check else None, first, second, gammas=config.gammas)

    def ste(anchor: StateDict, other: StateDict, start: Mapping[str, torch.Tensor], name: str) -> SteResult:
        def on_epoch(epoch: int, loss: float) -> None:
            if epoch % every == 0:
                _say(progress, f"  STE {name}: epoch {epoch}, mean midpoint batch loss {loss:.4f}")

        per_epoch = sum(1 for _ in iter_batches(train_data, config.ste_batch_size))
        every = max(1, -(-config.ste_steps // per_epoch) // 4)
        return ste_matching(
            spec, template, anchor, other, train_data, steps=config.ste_steps, lr=config.ste_lr,
            batch_size=config.ste_batch_size, optimizer=config.ste_optimizer, select=config.ste_select,  # type: ignore[arg-type]
            init_perms=start, device=device, callback=on_epoch,
        )

    # ---- A and B: every method
    _say(progress, f"aligning B to A by weight matching ({config.wm_seeds} seeds)")
    clock = time.perf_counter()
    wm_runs = [weight_matching(spec, sd_a, sd_b, seed=seed, device=device) for seed in range(config.wm_seeds)]
    seconds["weight_matching"] = (time.perf_counter() - clock) / config.wm_seeds
    wm = wm_runs[0]
    _say(progress, "aligning B to A by activation matching")
    clock = time.perf_counter()
    am = activation_matching(
        spec, template, sd_a, sd_b, activation_data if activation_data is not None else train_data,
        batch_size=config.am_batch_size, max_batches=config.am_batches,
        device=device,
    )
    seconds["activation_matching"] = time.perf_counter() - clock
    _say(progress, f"aligning B to A by STE ({config.ste_steps} {config.ste_optimizer} steps, lr {config.ste_lr:g})")
    ste_b = ste(sd_a, sd_b, wm.perms, "B->A")
    seconds["ste"] = ste_b.seconds
    _say(progress, f"  STE B->A: {ste_b.steps} steps in {ste_b.seconds:.1f} s ({ste_b.steps_per_second:.0f} steps/s)")
    perms = {"weight_matching": wm.perms, "activation_matching": am.perms, "ste": ste_b.perms}
    aligned_b = {"naive": sd_b, **{m: apply_permutation(spec, p, sd_b) for m, p in perms.items()}}
    _say(progress, "interpolating A -> B and measuring distances and singular vectors")
    curves = {method: curve(sd_a, b) for method, b in aligned_b.items()}
    analyses = {method: analyse(sd_a, b, check=method == "naive") for method, b in aligned_b.items()}
    distances = {method: l2_distance(sd_a, b) for method, b in aligned_b.items()}
    pair = {
        "barriers": {method: barrier_summary(c) for method, c in curves.items()},
        "curves": {method: c.to_dict() for method, c in curves.items()},
        "l2_distance": {method: d.to_dict() for method, d in distances.items()},
        "l2_reduction": {m: 1.0 - distances[m].absolute / distances["naive"].absolute for m in perms},
        "alignment": {method: _alignment(a) for method, a in analyses.items()},
        "alignment_mean_over_layers": {method: _alignment(a, "mean_layer_alignment") for method, a in analyses.items()},
        "alignment_per_layer": {
            method: {_gamma_key(g): {layer.name: layer.alignment for layer in x.layers} for g, x in a.items()}
            for method, a in analyses.items()
        },
        "singular_value_invariance_error": max(a.invariance_error or 0.0 for a in analyses["naive"].values()),
        "weight_matching_sweeps": wm.n_iter,
        "activation_matching_fallback_groups": list(am.fallback_groups),
    }

    _say(progress, "evaluating the other weight-matching seeds")
    seed_rows = []
    for seed, run in enumerate(wm_runs):
        b = aligned_b["weight_matching"] if seed == 0 else apply_permutation(spec, run.perms, sd_b)
        summary = pair["barriers"]["weight_matching"] if seed == 0 else barrier_summary(curve(sd_a, b))
        row = {
            "seed": seed,
            "test_loss_barrier": summary["test_loss"]["mean"],
            "train_loss_barrier": summary["train_loss"]["mean"],
            "test_accuracy_barrier": summary["test_accuracy"]["mean"],
            "l2_reduction": 1.0 - l2_distance(sd_a, b).absolute / distances["naive"].absolute,
            "sweeps": run.n_iter,
        }
        row.update({f"R {k}": v for k, v in _alignment(analyses["weight_matching"] if seed == 0 else analyse(sd_a, b)).items()})
        seed_rows.append(row)
    keys = [k for k in seed_rows[0] if k != "seed"]
    weight_matching_seeds = {
        "runs": seed_rows,
        **{k: _mean_std([row[k] for row in seed_rows]) for k in keys},
    }

    ste_report = _ste_summary(ste_b, wm.perms, config)

    # ---- three models: the anchor scheme and MergeMany
    _say(progress, "aligning C to anchor A (weight matching, STE)")
    wm_c = weight_matching(spec, sd_a, sd_c, device=device)
    ste_c = ste(sd_a, sd_c, wm_c.perms, "C->A")
    _say(progress, f"  STE C->A: {ste_c.steps} steps in {ste_c.seconds:.1f} s ({ste_c.steps_per_second:.0f} steps/s)")
    anchored = {
        "naive": (sd_b, sd_c),
        "weight_matching": (aligned_b["weight_matching"], apply_permutation(spec, wm_c.perms, sd_c)),
        "ste": (aligned_b["ste"], apply_permutation(spec, ste_c.perms, sd_c)),
    }
    _say(progress, "interpolating between the aligned B and C")
    anchor_curves = {method: curve(b, c) for method, (b, c) in anchored.items()}
    anchor = {
        "barriers_b_to_c": {method: barrier_summary(c) for method, c in anchor_curves.items()},
        "curves_b_to_c": {method: c.to_dict() for method, c in anchor_curves.items()},
        "alignment_b_to_c": {method: _alignment(analyse(b, c)) for method, (b, c) in anchored.items()},
        "ste_c": _ste_summary(ste_c, wm_c.perms, config),
    }
    _say(progress, "merging A, B and C with MergeMany")
    clock = time.perf_counter()
    merged = merge_many(spec, [sd_a, sd_b, sd_c], method="wm", device=device)
    seconds["merge_many"] = time.perf_counter() - clock
    permuted = [apply_permutation(spec, p, sd) for p, sd in zip(merged.perms, (sd_a, sd_b, sd_c))]
    naive_mean = {k: (sd_a[k] + sd_b[k] + sd_c[k]) / 3 if sd_a[k].is_floating_point() else sd_a[k] for k in sd_a}
    merge = {
        "individual": {name: metrics(sd) for name, sd in zip("ABC", (sd_a, sd_b, sd_c))},
        "merged": metrics(merged.state_dict),
        "naive_average": metrics(naive_mean),
        "alignment_to_models": {name: _alignment(analyse(merged.state_dict, sd)) for name, sd in zip("ABC", permuted)},
        "rounds": merged.n_iter,
    }

    # ---- files
    _say(progress, f"writing the report and plots to {out}")
    headline = config.gammas[-1]
    files = {
        "curves": plot_interpolation(
            {m.replace("_", " "): c for m, c in curves.items()}, out / "interpolation.png", "A -> B"
        ),
        "anchor_curves": plot_interpolation(
            {m.replace("_", " "): c for m, c in anchor_curves.items()}, out / "anchor_b_to_c.png",
            "B -> C, both aligned to anchor A",
        ),
        "spectra": plot_singular_values(
            analyses["weight_matching"][headline], out / "singular_values.png", ("A", "B (WM)")
        ),
        "alignment": plot_alignment(
            {m.replace("_", " "): a[headline] for m, a in analyses.items()}, out / "alignment.png"
        ),
    }
    seconds["analysis"] = seconds["total"] = time.perf_counter() - started
    report: dict[str, Any] = {
        "setting": setting,
        "config": {**asdict(config), "seeds": list(config.seeds), "gammas": list(config.gammas)},
        "models": {name: metrics(sd) for name, sd in zip("ABC", (sd_a, sd_b, sd_c))},
        "pair": pair,
        "weight_matching_seeds": weight_matching_seeds,
        "ste": ste_report,
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
