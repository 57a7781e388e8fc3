"""The demo: reproduce the findings of Ito et al. (arXiv 2402.04051) on scikit-learn's digits.

:func:`run_demo` trains three MLPs (3 hidden layers of 512, ReLU, Adam 1e-3) from different
seeds and measures:

1. the barrier between two models naively, after weight matching (WM) and after the
   straight-through estimator (STE) of Git Re-Basin (arXiv 2209.04836);
2. the L2 distance before and after matching next to the barrier reduction, the invariance of
   singular values under permutation, and the singular-vector alignment ``R`` before and after;
3. with three models: B and C aligned to anchor A (by WM and by STE), the barrier between the
   two aligned non-anchor models; and MergeMany's merged model against the individual ones.

It writes ``report.json`` and PNG plots into the output folder and returns the report as a dict.
Progress goes to ``logging`` and to an optional callback; :func:`format_report` renders the
printed summary.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autoperm.data import DigitsData, load_digits
from autoperm.evaluate import (
    InterpolationCurve,
    barrier_summary,
    evaluate_model,
    interpolation_curve,
    l2_distance,
    singular_analysis,
)
from autoperm.infer import infer_spec
from autoperm.models import MLP
from autoperm.spec import apply_permutation
from autoperm.spec.schema import write_text_atomic

__all__ = ["DemoConfig", "run_demo", "format_report", "train_classifier"]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; :meth:`quick` is the CI-sized variant.

    Attributes:
        epochs: training epochs per model (Adam, ``lr``, batches of ``batch_size``).
        hidden: width of the hidden layers; ``depth`` of them.
        num_points: points on each interpolation curve.
        ste_epochs: epochs of the straight-through estimator; ``ste_lr`` its learning rate. Git
            Re-Basin's 1e-2 leaves STE at its weight-matching start here, because the midpoint
            loss of the matched digits models is already about 0.004; 10 lets it move.
        gamma: singular-value threshold of the alignment ``R``.
        seeds: seeds of models A, B and C.
    """

    epochs: int = 60
    hidden: int = 512
    depth: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    num_points: int = 25
    ste_epochs: int = 10
    ste_lr: float = 10.0
    ste_batch_size: int = 500
    gamma: float = 0.3
    seeds: tuple[int, int, int] = (0, 1, 2)

    @classmethod
    def quick(cls) -> DemoConfig:
        """Narrower models, few epochs and points: every section present, in seconds rather than minutes."""
        return cls(epochs=6, hidden=128, num_points=5, ste_epochs=1)


def train_classifier(
    model: nn.Module,
    data: DigitsData,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
    name: str = "model",
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy on ``data.train``; returns it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for inputs, targets in data.loader("train", batch_size=batch_size, seed=seed * 100_003 + epoch):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * targets.shape[0]
            count += targets.shape[0]
        if epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 4) == 0:
            _say(progress, f"  {name}: epoch {epoch + 1}/{epochs}, train loss {total / count:.4f}")
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


def run_demo(
    out_dir: str | Path = "autoperm-demo",
    quick: bool = False,
    config: DemoConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the whole demo and write ``report.json`` plus plots into ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: use :meth:`DemoConfig.quick` (ignored when ``config`` is given).
        config: explicit settings.
        progress: called with one line of text per step (also logged at INFO).

    Returns:
        The report (the content of ``report.json``); keys ``config``, ``models``, ``pair``,
        ``anchor``, ``merge``, ``files``, ``seconds``. Barriers are ``{metric: {"mean", "linear"}}``.

    Example:
        >>> report = run_demo("autoperm-demo", quick=True)
        >>> report["pair"]["barriers"]["weight_matching"]["test_loss"]["mean"]
    """
    from autoperm.evaluate.plots import plot_alignment, plot_interpolation, plot_singular_values
    from autoperm.solvers import merge_many, ste_matching, weight_matching

    config = config or (DemoConfig.quick() if quick else DemoConfig())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    data = load_digits()
    splits = data.splits()

    def build(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
            torch.manual_seed(seed)
            return MLP(data.num_features, config.hidden, config.depth, data.num_classes)

    # ---- training
    clock = time.perf_counter()
    names = ("A", "B", "C")
    state_dicts: dict[str, StateDict] = {}
    for name, seed in zip(names, config.seeds):
        _say(progress, f"training model {name} (seed {seed}, {config.epochs} epochs)")
        model = train_classifier(build(seed), data, config.epochs, config.lr, config.batch_size, seed, progress, name)
        state_dicts[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds["training"] = time.perf_counter() - clock
    template = build(config.seeds[0])
    spec = infer_spec(template, (data.train[0][:2],))
    sd_a, sd_b, sd_c = (state_dicts[name] for name in names)

    def metrics(state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        model = copy.deepcopy(template)
        model.load_state_dict(state_dict)
        return {f"{split}_{k}": v for split, d in splits.items() for k, v in evaluate_model(model, d).items()}

    def curve(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> InterpolationCurve:
        return interpolation_curve(template, first, second, splits, num_points=config.num_points)

    ste_data = data.loader("train", batch_size=config.ste_batch_size, seed=0)

    def ste(anchor: StateDict, other: StateDict) -> dict[str, torch.Tensor]:
        result = ste_matching(spec, template, anchor, other, ste_data, epochs=config.ste_epochs, lr=config.ste_lr)
        return result.perms

    # ---- 1 & 2: two models
    _say(progress, "aligning B to A by weight matching")
    clock = time.perf_counter()
    wm = weight_matching(spec, sd_a, sd_b)
    seconds["weight_matching"] = time.perf_counter() - clock
    _say(progress, f"  {wm.n_iter} sweeps, {seconds['weight_matching']:.2f} s")
    _say(progress, "aligning B to A by the straight-through estimator")
    clock = time.perf_counter()
    ste_perms_b = ste(sd_a, sd_b)
    seconds["ste"] = time.perf_counter() - clock
    _say(progress, f"  {config.ste_epochs} epochs, {seconds['ste']:.2f} s")
    aligned_b = {
        "naive": sd_b,
        "weight_matching": apply_permutation(spec, wm.perms, sd_b),
        "ste": apply_permutation(spec, ste_perms_b, sd_b),
    }
    _say(progress, "interpolating A -> B (naive, weight matching, STE)")
    curves = {method: curve(sd_a, b) for method, b in aligned_b.items()}
    analyses = {method: singular_analysis(spec, sd_a, b, gamma=config.gamma) for method, b in aligned_b.items()}
    distances = {method: l2_distance(sd_a, b) for method, b in aligned_b.items()}
    pair = {
        "barriers": {method: barrier_summary(c) for method, c in curves.items()},
        "curves": {method: c.to_dict() for method, c in curves.items()},
        "l2_distance": {method: d.to_dict() for method, d in distances.items()},
        "l2_reduction": {
            method: 1.0 - distances[method].absolute / distances["naive"].absolute for method in ("weight_matching", "ste")
        },
        "alignment": {method: a.alignment for method, a in analyses.items()},
        "alignment_per_layer": {method: {layer.name: layer.alignment for layer in a.layers} for method, a in analyses.items()},
        "singular_value_invariance_error": max(a.invariance_error or 0.0 for a in analyses.values()),
        "weight_matching_sweeps": wm.n_iter,
    }

    # ---- 3: three models
    _say(progress, "aligning C to anchor A (weight matching, STE) and merging A, B, C with MergeMany")
    wm_c = weight_matching(spec, sd_a, sd_c)
    anchored = {
        "weight_matching": (aligned_b["weight_matching"], apply_permutation(spec, wm_c.perms, sd_c)),
        "ste": (aligned_b["ste"], apply_permutation(spec, ste(sd_a, sd_c), sd_c)),
        "naive": (sd_b, sd_c),
    }
    anchor_curves = {method: curve(b, c) for method, (b, c) in anchored.items()}
    anchor = {
        "barriers_b_to_c": {method: barrier_summary(c) for method, c in anchor_curves.items()},
        "curves_b_to_c": {method: c.to_dict() for method, c in anchor_curves.items()},
        "alignment_b_to_c": {
            method: singular_analysis(None, b, c, gamma=config.gamma).alignment for method, (b, c) in anchored.items()
        },
    }
    clock = time.perf_counter()
    merged = merge_many(spec, [sd_a, sd_b, sd_c], method="wm")
    seconds["merge_many"] = time.perf_counter() - clock
    permuted = [apply_permutation(spec, p, sd) for p, sd in zip(merged.perms, (sd_a, sd_b, sd_c))]
    naive_mean = {
        k: (sd_a[k] + sd_b[k] + sd_c[k]) / 3 if sd_a[k].is_floating_point() else sd_a[k] for k in sd_a
    }
    merge = {
        "individual": {name: metrics(sd) for name, sd in state_dicts.items()},
        "merged": metrics(merged.state_dict),
        "naive_average": metrics(naive_mean),
        "alignment_to_models": {
            name: singular_analysis(None, merged.state_dict, sd, gamma=config.gamma).alignment
            for name, sd in zip(names, permuted)
        },
        "rounds": merged.n_iter,
    }

    # ---- files
    _say(progress, f"writing the report and plots to {out}")
    files = {
        "curves": plot_interpolation(
            {m.replace("_", " "): c for m, c in curves.items()}, out / "interpolation.png", "A -> B"
        ),
        "anchor_curves": plot_interpolation(
            {m.replace("_", " "): c for m, c in anchor_curves.items()}, out / "anchor_b_to_c.png",
            "B -> C, both aligned to anchor A",
        ),
        "spectra": plot_singular_values(analyses["weight_matching"], out / "singular_values.png", ("A", "B (WM)")),
        "alignment": plot_alignment({m.replace("_", " "): a for m, a in analyses.items()}, out / "alignment.png"),
    }
    seconds["total"] = time.perf_counter() - started
    report: dict[str, Any] = {
        "config": {**asdict(config), "seeds": list(config.seeds)},
        "models": {name: metrics(sd) for name, sd in state_dicts.items()},
        "pair": pair,
        "anchor": anchor,
        "merge": merge,
        "files": {key: str(path) for key, path in {**files, "report": out / "report.json"}.items()},
        "seconds": seconds,
    }
    if not _finite(report):
        logger.warning("the demo report holds non-finite numbers")
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The printed summary of a :func:`run_demo` report: the three findings as small tables."""
    pair, anchor, merge = report["pair"], report["anchor"], report["merge"]
    lines = ["", "1. Barriers between A and B: mean = max_t L(t) - (L_A + L_B)/2, linear = max_t L(t) - ((1-t)L_A + tL_B)"]
    lines.append(f"   {'method':<18}{'test loss':>19}{'train loss':>19}{'test acc drop':>16}{'train acc drop':>16}")
    lines.append(f"   {'':<18}{'mean    linear':>19}{'mean    linear':>19}{'(mean, points)':>16}{'(mean, points)':>16}")
    for method, barriers in pair["barriers"].items():
        lines.append(
            f"   {method:<18}{barriers['test_loss']['mean']:>10.4f}{barriers['test_loss']['linear']:>9.4f}"
            f"{barriers['train_loss']['mean']:>10.4f}{barriers['train_loss']['linear']:>9.4f}"
            f"{100 * barriers['test_accuracy']['mean']:>16.2f}{100 * barriers['train_accuracy']['mean']:>16.2f}"
        )
    lines.append("")
    lines.append("2. Distance falls modestly, the barrier collapses; permutations keep singular values")
    lines.append(f"   {'method':<18}{'L2 distance':>12}{'reduction':>11}{'R (gamma ' + str(report['config']['gamma']) + ')':>16}")
    for method, distance in pair["l2_distance"].items():
        reduction = pair["l2_reduction"].get(method, 0.0)
        lines.append(
            f"   {method:<18}{distance['absolute']:>12.2f}{100 * reduction:>10.1f}%{pair['alignment'][method]:>16.3f}"
        )
    lines.append(f"   largest singular-value change under a random permutation: {pair['singular_value_invariance_error']:.1e}")
    lines.append("")
    lines.append("3. Three models: B and C aligned to anchor A; barrier between them")
    lines.append(f"   {'method':<18}{'test loss':>19}{'train loss':>19}{'test acc drop':>16}{'R(B, C)':>10}")
    for method, barriers in anchor["barriers_b_to_c"].items():
        lines.append(
            f"   {method:<18}{barriers['test_loss']['mean']:>10.4f}{barriers['test_loss']['linear']:>9.4f}"
            f"{barriers['train_loss']['mean']:>10.4f}{barriers['train_loss']['linear']:>9.4f}"
            f"{100 * barriers['test_accuracy']['mean']:>16.2f}{anchor['alignment_b_to_c'][method]:>10.3f}"
        )
    lines.append(f"   MergeMany ({merge['rounds']} rounds) vs the individual models (test):")
    rows = {**{f"model {k}": v for k, v in merge["individual"].items()}, "merged (MergeMany)": merge["merged"],
            "naive average": merge["naive_average"]}
    for name, values in rows.items():
        lines.append(f"   {name:<22}loss {values['test_loss']:.4f}  accuracy {100 * values['test_accuracy']:.2f}%")
    alignment = ", ".join(f"{k} {v:.3f}" for k, v in merge["alignment_to_models"].items())
    lines.append(f"   R of the merged model to each aligned model: {alignment}")
    lines.append("")
    lines.append(f"Finished in {report['seconds']['total']:.1f} s; report and plots:")
    lines.extend(f"   {path}" for path in report["files"].values())
    return "\n".join(lines)
