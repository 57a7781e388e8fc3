"""Linear mode connectivity: interpolation curves, loss and accuracy barriers, BatchNorm reset.

``theta(t) = (1 - t) theta_A + t theta_B``; a *barrier* is how far the loss rises (or the accuracy
falls) along the path above the endpoints. References: Frankle et al. 2020; Entezari et al. 2022
(arXiv 2110.06296); Ainsworth et al., "Git Re-Basin" (arXiv 2209.04836); Jordan et al.,
"REPAIR" (arXiv 2211.08403) for why BatchNorm statistics must be recomputed.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from autoperm.data import Data, DataError, iter_batches
from autoperm.errors import AutopermError

__all__ = [
    "InterpolationCurve",
    "Evaluator",
    "evaluate_model",
    "interpolate_state_dicts",
    "interpolation_curve",
    "loss_barrier",
    "accuracy_barrier",
    "barrier_summary",
    "check_compatible",
    "reset_bn_stats",
]

logger = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module], Mapping[str, float]]
"""A function of a model (in eval mode) returning named metrics such as ``{"loss": ..., "accuracy": ...}``."""

BarrierKind = Literal["mean", "linear"]


@dataclass(frozen=True)
class InterpolationCurve:
    """Metrics along the linear path between two state dicts.

    Attributes:
        t: the interpolation coefficients, ``t[0] == 0`` (model A) and ``t[-1] == 1`` (model B).
        metrics: metric name -> one value per ``t``. With data splits the names are
            ``"{split}_loss"`` and ``"{split}_accuracy"`` (e.g. ``test_loss``); with an evaluator
            they are the keys it returns.
    """

    t: tuple[float, ...]
    metrics: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.metrics.items():
            if len(values) != len(self.t):
                raise ValueError(f"metric {name!r} has {len(values)} values for {len(self.t)} points")

    def __getitem__(self, name: str) -> tuple[float, ...]:
        try:
            return self.metrics[name]
        except KeyError:
            raise AutopermError(f"the curve has no metric {name!r}; it has {sorted(self.metrics)}") from None

    def to_dict(self) -> dict[str, list[float]]:
        """Plain data for JSON: ``{"t": [...], metric: [...], ...}``."""
        return {"t": list(self.t), **{name: list(values) for name, values in self.metrics.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> InterpolationCurve:
        """Inverse of :meth:`to_dict`."""
        return cls(
            t=tuple(float(v) for v in data["t"]),
            metrics={k: tuple(float(v) for v in values) for k, values in data.items() if k != "t"},
        )


def _pick_metric(curve: InterpolationCurve, suffix: str, metric: str | None) -> str:
    if metric is not None:
        curve[metric]  # raises a clear error when missing
        return metric
    for name in (f"test_{suffix}", suffix, f"data_{suffix}"):
        if name in curve.metrics:
            return name
    candidates = [name for name in curve.metrics if name.endswith(suffix)]
    if len(candidates) == 1:
        return candidates[0]
    raise AutopermError(
        f"cannot tell which {suffix} metric to use among {sorted(curve.metrics)}; pass metric=..."
    )


def _barrier(t: Sequence[float], values: Sequence[float], kind: BarrierKind, sign: float) -> float:
    """``max_t sign*(v(t) - baseline(t))`` with the mean or linear baseline."""
    if kind not in ("mean", "linear"):
        raise AutopermError(f"barrier kind must be 'mean' or 'linear', got {kind!r}")
    if len(values) < 2:
        raise AutopermError("a barrier needs at least the two endpoints of the curve")
    first, last = values[0], values[-1]
    gaps = []
    for ti, value in zip(t, values):
        baseline = (first + last) / 2 if kind == "mean" else (1 - ti) * first + ti * last
        gaps.append(sign * (value - baseline))
    return max(gaps)


def loss_barrier(curve: InterpolationCurve, kind: BarrierKind = "mean", metric: str | None = None) -> float:
    """The loss barrier of an interpolation curve.

    - ``kind="mean"`` (Git Re-Basin, arXiv 2209.04836): ``max_t L(t) - (L(0) + L(1)) / 2``.
    - ``kind="linear"`` (Entezari et al., arXiv 2110.06296): ``max_t [L(t) - ((1-t) L(0) + t L(1))]``;
      never negative, since the endpoints give 0.

    Args:
        curve: from :func:`interpolation_curve`.
        kind: ``"mean"`` or ``"linear"``.
        metric: which loss; by default ``test_loss``, else ``loss``, else the only ``*loss`` metric.

    Returns:
        The barrier height (same units as the loss).

    Example:
        >>> curve = InterpolationCurve(t=(0, 0.5, 1), metrics={"loss": (0.1, 0.9, 0.3)})
        >>> round(loss_barrier(curve), 6)
        0.7
    """
    name = _pick_metric(curve, "loss", metric)
    return _barrier(curve.t, curve[name], kind, sign=1.0)


def accuracy_barrier(curve: InterpolationCurve, kind: BarrierKind = "mean", metric: str | None = None) -> float:
    """The accuracy barrier: like :func:`loss_barrier` with the sign flipped (a drop in accuracy).

    ``kind="mean"``: ``(acc(0) + acc(1)) / 2 - min_t acc(t)``; ``kind="linear"``:
    ``max_t [((1-t) acc(0) + t acc(1)) - acc(t)]``. Accuracy is a fraction in [0, 1].
    """
    name = _pick_metric(curve, "accuracy", metric)
    return _barrier(curve.t, curve[name], kind, sign=-1.0)


def barrier_summary(curve: InterpolationCurve) -> dict[str, dict[str, float]]:
    """Every barrier of a curve: ``{metric: {"mean": ..., "linear": ...}}`` for each loss and accuracy metric.

    Loss metrics (names ending in ``loss``) use :func:`loss_barrier`, accuracy metrics
    :func:`accuracy_barrier`; other metrics are left out.
    """
    summary: dict[str, dict[str, float]] = {}
    for name in curve.metrics:
        if name.endswith("loss"):
            summary[name] = {kind: loss_barrier(curve, kind, name) for kind in ("mean", "linear")}
        elif name.endswith("accuracy"):
            summary[name] = {kind: accuracy_barrier(curve, kind, name) for kind in ("mean", "linear")}
    return summary


def evaluate_model(
    model: nn.Module,
    data: Data,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``model`` over ``data``, in eval mode, no grad.

    Args:
        model: the model; put in eval mode (and left there).
        data: see :func:`autoperm.data.iter_batches`.
        loss_fn: ``loss_fn(outputs, targets)`` giving the *mean* loss of a batch; cross-entropy by default.
        device: where to run.

    Returns:
        ``{"loss": ..., "accuracy": ...}``; accuracy (argmax of the outputs against integer
        targets) only when the outputs are ``(batch, classes)`` logits.
    """
    loss_fn = loss_fn or F.cross_entropy
    model.eval()
    total_loss, total_correct, count = 0.0, 0, 0
    classification = True
    with torch.no_grad():
        for inputs, targets in iter_batches(data):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = _forward(model, inputs)
            batch = targets.shape[0]
            total_loss += float(loss_fn(outputs, targets)) * batch
            count += batch
            if outputs.dim() == 2 and not targets.is_floating_point() and targets.dim() == 1:
                total_correct += int((outputs.argmax(dim=1) == targets).sum())
            else:
                classification = False
    if count == 0:
        raise DataError("the evaluation data yielded no samples")
    metrics = {"loss": total_loss / count}
    if classification:
        metrics["accuracy"] = total_correct / count
    return metrics


def _forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    try:
        return model(inputs)
    except RuntimeError as error:  # shape or dtype mismatch between the data and the model
        raise DataError(
            f"the model failed on a batch of inputs of shape {list(inputs.shape)} ({inputs.dtype}): {error}. "
            "Does the data fit the model?"
        ) from error


def interpolate_state_dicts(
    sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    """``(1 - t) * sd_a + t * sd_b`` for floating tensors; integer tensors (step counters) come from A.

    Raises:
        AutopermError: the state dicts have different names or shapes.
    """
    check_compatible(sd_a, sd_b)
    result: dict[str, torch.Tensor] = {}
    for name, a in sd_a.items():
        b = sd_b[name]
        result[name] = torch.lerp(a, b.to(a.dtype), t) if a.is_floating_point() else a.clone()
    return result


def check_compatible(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`AutopermError` unless the two state dicts have the same names and shapes."""
    only_a = sorted(set(sd_a) - set(sd_b))
    only_b = sorted(set(sd_b) - set(sd_a))
    if only_a or only_b:
        raise AutopermError(
            f"the two state dicts differ: only in A {only_a[:3]}, only in B {only_b[:3]}; "
            "are they checkpoints of the same architecture?"
        )
    for name, a in sd_a.items():
        if a.shape != sd_b[name].shape:
            raise AutopermError(
                f"{name!r} has shape {list(a.shape)} in A but {list(sd_b[name].shape)} in B"
            )


def reset_bn_stats(model: nn.Module, data: Data, device: str | torch.device = "cpu") -> nn.Module:
    """Recompute every BatchNorm's running statistics over ``data``, in place.

    Each BatchNorm forgets its statistics and averages the batch statistics cumulatively
    (``momentum=None``) over one pass in train mode without gradients; momentum and the
    train/eval mode of every module are restored afterwards. A model without BatchNorm is left
    untouched. Needed before evaluating an interpolated model: averaging two networks' running
    statistics does not give the statistics of the averaged network (variance collapse; REPAIR,
    arXiv 2211.08403).

    Args:
        model: modified in place.
        data: training data, see :func:`autoperm.data.iter_batches`.
        device: where to run.

    Returns:
        ``model``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    modes = {module: module.training for module in model.modules()}
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    seen = 0
    try:
        with torch.no_grad():
            for inputs, _ in iter_batches(data):
                _forward(model, inputs.to(device))
                seen += inputs.shape[0]
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    if seen == 0:
        raise DataError("the BatchNorm reset data yielded no samples")
    return model


def interpolation_curve(
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    evaluate: Evaluator | Mapping[str, Data] | Data,
    num_points: int = 25,
    reset_bn: Data | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    transform: Callable[[dict[str, torch.Tensor], float], Mapping[str, torch.Tensor]] | None = None,
) -> InterpolationCurve:
    """Evaluate ``theta(t) = (1 - t) sd_a + t sd_b`` at ``num_points`` evenly spaced ``t`` in [0, 1].

    Neither ``model`` nor the state dicts are modified: a deep copy of ``model`` is loaded with
    each interpolated state dict.

    Args:
        model: a module of the architecture both state dicts belong to.
        sd_a: state dict of model A (``t = 0``); align B to A first for a matched curve.
        sd_b: state dict of model B (``t = 1``).
        evaluate: either a callable ``evaluate(model) -> {metric: value}`` (called in eval mode),
            or named splits ``{"train": data, "test": data}`` (metrics ``train_loss``,
            ``train_accuracy``, ...), or a single data source (metrics ``loss``, ``accuracy``).
            Data forms: see :func:`autoperm.data.iter_batches`.
        num_points: number of ``t`` values, at least 2 (25 in Git Re-Basin).
        reset_bn: training data over which BatchNorm statistics of every interpolated model are
            recomputed (:func:`reset_bn_stats`) before evaluation; ``None`` keeps the
            interpolated running statistics.
        loss_fn: loss for data splits (cross-entropy by default); unused with a callable.
        device: where to evaluate.
        progress: called as ``progress(done, total)`` after each point.
        transform: ``transform(state_dict, t)`` returns the state dict to evaluate in place of
            the interpolated one (after the BatchNorm reset, if any); an
            :class:`autoperm.Repairer` applies REPAIR (arXiv 2211.08403) this way.

    Returns:
        An :class:`InterpolationCurve`.

    Raises:
        AutopermError: the state dicts do not fit each other or the model, or ``num_points < 2``.

    Example:
        >>> curve = interpolation_curve(model, sd_a, sd_b_aligned, {"test": (x, y)}, num_points=11)
        >>> loss_barrier(curve)
    """
    if num_points < 2:
        raise AutopermError(f"num_points must be at least 2, got {num_points}")
    check_compatible(sd_a, sd_b)
    evaluator = _as_evaluator(evaluate, loss_fn, device)
    work = copy.deepcopy(model).to(device)
    ts = [i / (num_points - 1) for i in range(num_points)]
    columns: dict[str, list[float]] = {}
    for index, t in enumerate(ts):
        state = interpolate_state_dicts(sd_a, sd_b, t)
        try:
            work.load_state_dict(state)
        except RuntimeError as error:
            raise AutopermError(f"the state dicts do not fit the model: {error}") from error
        if reset_bn is not None:
            reset_bn_stats(work, reset_bn, device)
        if transform is not None:
            work.load_state_dict(transform({k: v.detach().clone() for k, v in work.state_dict().items()}, t))
        work.eval()
        metrics = evaluator(work)
        if index > 0 and set(metrics) != set(columns):
            raise AutopermError(f"the evaluator returned metrics {sorted(metrics)} at t={t}, earlier {sorted(columns)}")
        for name, value in metrics.items():
            columns.setdefault(name, []).append(float(value))
        logger.debug("t=%.3f %s", t, {k: round(float(v), 4) for k, v in metrics.items()})
        if progress is not None:
            progress(index + 1, num_points)
    for name, values in columns.items():
        if not all(math.isfinite(v) for v in values):
            logger.warning("metric %s is not finite somewhere along the path", name)
    return InterpolationCurve(t=tuple(ts), metrics={k: tuple(v) for k, v in columns.items()})


def _as_evaluator(
    evaluate: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    device: str | torch.device,
) -> Evaluator:
    if callable(evaluate) and not isinstance(evaluate, (nn.Module, torch.utils.data.DataLoader)):
        return evaluate
    if isinstance(evaluate, Mapping):
        splits = dict(evaluate)
        if not splits:
            raise AutopermError("evaluate: give at least one data split")

        def evaluate_splits(model: nn.Module) -> dict[str, float]:
            return {
                f"{split}_{metric}": value
                for split, data in splits.items()
                for metric, value in evaluate_model(model, data, loss_fn, device).items()
            }

        return evaluate_splits
    return lambda model: evaluate_model(model, evaluate, loss_fn, device)
