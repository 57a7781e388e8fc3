"""REPAIR: renormalise the channels of an interpolated network, on any architecture.

Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair"
(arXiv 2211.08403). After model B is aligned to model A, the midpoint (or any point
``theta(t) = (1 - t) theta_A + t theta_B``) of the two suffers *variance collapse*: its hidden
channels have a much smaller spread than either endpoint's. REPAIR measures, for every permuted
channel at a pre-activation (the output of a conv / linear / norm layer), its mean and standard
deviation over training data in A and in B, and rescales the interpolated network's channel to
mean ``(1 - t) mu_A + t mu_B`` and std ``(1 - t) s_A + t s_B``; the affine correction is then
folded into the layer's weights.

The authors' code wraps hand-picked layers of each architecture. Here the sites come from the
permutation spec, which records them at inference (``PermutationSpec.affine_sites``): a *site*
is a call of a layer with a per-channel affine (Linear, ConvNd, BatchNorm, LayerNorm, GroupNorm,
RMSNorm, or their functional / ATen forms, including ``addmm`` as written by Hugging Face's
``Conv1D``) whose output channels are moved by an active permutation group. A layer whose output
goes only into another site that is a norm (a conv feeding its BatchNorm) is left to that norm.
REPAIR never looks at the graph: an :class:`autoperm.spec.runner.ActivationRunner` gives it the
sites' outputs. As in the authors' code, the interpolated
network's statistics are gathered in one pass in which every site is already renormalised with
its batch statistics, so each site sees the corrected network upstream of it.

Folding: for a channel ``c`` with output ``y_c``, the correction ``a_c y_c + b_c`` becomes
``weight[c] *= a_c`` (along the layer's output axis) and ``bias[c] = a_c bias[c] + b_c``; the
result is a plain state dict of the same architecture. A layer without a bias (``bias=False``,
RMSNorm) gets a scale-only correction that matches the root mean square
``(1 - t) rms_A + t rms_B`` instead. The result is meant for eval mode: BatchNorm running
statistics are kept and the correction lives in the affine, so do not reset them afterwards
(resetting BatchNorm statistics, :func:`autoperm.reset_bn_stats`, is the BatchNorm-only special
case of REPAIR; pass ``reset_bn`` to :func:`autoperm.interpolation_curve` to do it first).

LayerNorm networks: a LayerNorm's output is corrected per channel through its affine, and
linear layers per output unit, as anywhere else; since LayerNorm renormalises each token over
all channels, corrections of the layers that write into the residual stream are partly undone
by the next LayerNorm. Attention's query/key channels are corrected like any linear output,
which changes the attention logits; nothing inside the softmax is corrected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from autoperm.data import Data, input_batches
from autoperm.errors import AutopermError, DataError, SpecError
from autoperm.evaluate.barrier import interpolate_state_dicts
from autoperm.spec import AffineSite, PermutationSpec
from autoperm.spec.apply import layout_positions
from autoperm.spec.runner import ActivationRunner, NodeEdit

__all__ = ["RepairSite", "RepairResult", "Repairer", "repair_sites"]

logger = logging.getLogger(__name__)


class RepairSite(AffineSite):
    """An affine site of the spec whose output channels REPAIR corrects.

    Attributes:
        channels: the output channels corrected (those an active permutation group moves).
        groups: names of those groups.
    """

    channels: tuple[int, ...]
    groups: tuple[str, ...]

    @property
    def op(self) -> str:
        """The op or module class (``"Conv2d"``, ``"linear"``, ``"addmm"``, ``"layer_norm"``, ...)."""
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node, "op": self.kind, "weight": self.weight, "bias": self.bias,
            "channels": len(self.channels), "groups": list(self.groups),
        }


@dataclass(frozen=True)
class RepairResult:
    """A repaired interpolated model.

    Attributes:
        state_dict: the corrected state dict (same names and shapes as the inputs).
        t: the interpolation coefficient.
        sites: the corrected layer calls.
        scale: site node -> per-channel factor folded into the weight (1 = unchanged).
        shift: site node -> per-channel shift folded into the bias.
        std_ratio: site node -> mean over channels of the interpolated network's standard
            deviation (before its own correction, upstream already corrected) over the goal
            standard deviation: REPAIR's measure of variance collapse (1 = none).
    """

    state_dict: dict[str, torch.Tensor]
    t: float
    sites: tuple[RepairSite, ...]
    scale: dict[str, torch.Tensor] = field(default_factory=dict)
    shift: dict[str, torch.Tensor] = field(default_factory=dict)
    std_ratio: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ sites
def repair_sites(spec: PermutationSpec) -> tuple[RepairSite, ...]:
    """The layer calls whose permuted output channels REPAIR corrects, read from the spec.

    Every affine site the spec records (``spec.affine_sites``) whose weight's output axis an
    active group moves, except a layer that only feeds norm sites (a conv feeding its
    BatchNorm), whose norm is corrected instead.

    Args:
        spec: a spec made by :func:`autoperm.infer_spec` (only active groups count).

    Returns:
        The sites, in graph order.

    Raises:
        SpecError: the spec records no affine sites (written by hand, or by an older autoperm).
    """
    if spec.affine_sites is None:
        raise SpecError(
            "REPAIR needs the spec's affine_sites (the layers whose channels it corrects), and this spec has none: "
            "it was written by hand or by an older autoperm; make it again with `autoperm spec` or autoperm.infer_spec"
        )
    sites: list[RepairSite] = []
    for site in spec.affine_sites:
        if site.feeds:
            continue  # a conv feeding its BatchNorm: the norm is corrected instead
        channels: set[int] = set()
        groups: list[str] = []
        for group, member in spec.members_by_param.get(site.weight, ()):
            if member.axis == site.weight_axis:
                channels.update(int(p) for p in layout_positions(member, group.size).flatten())
                groups.append(group.name)
        if channels:
            sites.append(RepairSite(**site.model_dump(), channels=tuple(sorted(channels)), groups=tuple(dict.fromkeys(groups))))
    logger.info("REPAIR: %d site(s) with %d channels", len(sites), sum(len(s.channels) for s in sites))
    return tuple(sites)


# -------------------------------------------------------------------------- statistics
class _Moments:
    """Per-channel count, sum and sum of squares (accumulated in float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Add ``(samples, channels)`` rows; returns this batch's ``(count, sum, sum of squares)``."""
        total = rows.sum(0, dtype=torch.float64)
        squares = (rows * rows).sum(0, dtype=torch.float64)
        self.count += rows.shape[0]
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        return rows.shape[0], total, squares

    def mean(self) -> torch.Tensor:
        assert self.total is not None and self.count > 0
        return self.total / self.count

    def second(self) -> torch.Tensor:
        assert self.squares is not None and self.count > 0
        return self.squares / self.count

    def std(self) -> torch.Tensor:
        return (self.second() - self.mean() ** 2).clamp_min(0).sqrt()


def _rows(value: torch.Tensor, site: RepairSite, channels: torch.Tensor | None) -> torch.Tensor:
    """The site's channels of one output as ``(samples, channels)``; ``channels=None``: all of them."""
    moved = value.movedim(site.channel_axis, -1)
    if channels is not None:
        moved = moved.index_select(-1, channels.to(moved.device))
    return moved.reshape(-1, moved.shape[-1])


def _affine(value: torch.Tensor, site: RepairSite, channels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``value`` with its channels ``c`` mapped to ``scale_c * y + shift_c`` (other channels unchanged)."""
    size = value.shape[site.channel_axis]
    factor = torch.ones(size, dtype=torch.float64, device=value.device)
    offset = torch.zeros(size, dtype=torch.float64, device=value.device)
    factor[channels.to(value.device)] = scale.to(value.device)
    offset[channels.to(value.device)] = shift.to(value.device)
    view = [1] * value.dim()
    view[site.channel_axis] = size
    return value * factor.to(value.dtype).view(view) + offset.to(value.dtype).view(view)


def _batches(data: Data, batch_size: int, max_batches: int | None) -> list[Any]:
    batches = input_batches(data, batch_size, max_batches)
    if not batches:
        raise DataError("REPAIR got no batches from data; give (inputs, targets) batches of training data")
    return batches


@dataclass
class _Goal:
    mean: torch.Tensor
    std: torch.Tensor
    rms: torch.Tensor


class Repairer:
    """REPAIR between two aligned models, endpoint statistics measured once.

    Call it with an interpolated state dict and its ``t`` to get the repaired state dict, or
    use :meth:`repair` for the point ``t`` of the straight line. Pass it as ``transform`` to
    :func:`autoperm.interpolation_curve` for a repaired barrier curve. The sites come from the
    spec (:func:`repair_sites`); ``runner`` runs the model to read their outputs
    (:class:`autoperm.Repairer` builds it from the model).

    Args:
        spec: the spec the sites are read from (made by :func:`autoperm.infer_spec`).
        runner: yields the outputs of the spec's nodes, e.g. ``autoperm.trace.GraphRunner.for_spec(spec, model)``.
        state_dict_a: model A.
        state_dict_b: model B, already aligned to A (``apply_permutation`` of a matching).
        data: training data, ``(inputs, targets)`` batches or an ``(inputs, targets)`` pair.
        batch_size: batch size when ``data`` is a tensor pair.
        max_batches: use at most this many batches.
        eps: added to variances before dividing (as BatchNorm's eps).
        sites: the sites to correct; by default :func:`repair_sites` of the spec.
        device: where the batches go (the runner runs the model there).

    Raises:
        SpecError: the state dicts do not fit the spec, or the spec records no affine sites.
        DataError: no batches in ``data``.

    Example:
        >>> repairer = Repairer(spec, GraphRunner.for_spec(spec, model), sd_a, sd_b_aligned, (x_train, y_train))
        >>> midpoint = repairer.repair(0.5).state_dict
        >>> curve = interpolation_curve(model, sd_a, sd_b_aligned, splits, transform=repairer)
    """

    def __init__(
        self,
        spec: PermutationSpec,
        runner: ActivationRunner,
        state_dict_a: Mapping[str, torch.Tensor],
        state_dict_b: Mapping[str, torch.Tensor],
        data: Data,
        *,
        batch_size: int = 500,
        max_batches: int | None = None,
        eps: float = 1e-5,
        sites: Iterable[RepairSite] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        spec.check_state_dict(state_dict_a, "state dict A")
        spec.check_state_dict(state_dict_b, "state dict B")
        self.spec = spec
        self.runner = runner
        self.eps = eps
        self.device = torch.device(device)
        self.batches = [b.to(self.device) if isinstance(b, torch.Tensor) else b for b in _batches(data, batch_size, max_batches)]
        self.sites = tuple(sites) if sites is not None else repair_sites(spec)
        if not self.sites:
            logger.warning("REPAIR: no layer with a per-channel affine writes a permuted channel; nothing to correct")
        self._channels = {site.node: torch.tensor(site.channels, dtype=torch.long) for site in self.sites}
        # None where a site corrects every channel of its output (no gather needed)
        self._selection = {
            site.node: None if site.channels == tuple(range(_channel_count(spec, site))) else self._channels[site.node]
            for site in self.sites
        }
        self.state_dict_a = dict(state_dict_a)
        self.state_dict_b = dict(state_dict_b)
        self.endpoint_moments = [self._moments(state_dict) for state_dict in (self.state_dict_a, self.state_dict_b)]

    # ------------------------------------------------------------------ passes
    def _stream(self, state_dict: Mapping[str, torch.Tensor], edit: NodeEdit | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Site outputs of every batch."""
        return self.runner.stream([site.node for site in self.sites], self.batches, state_dict, edit)

    def _moments(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, _Moments]:
        moments = {site.node: _Moments() for site in self.sites}
        if not self.sites:
            return moments
        for values in self._stream(state_dict):
            for site in self.sites:
                moments[site.node].add(_rows(values[site.node], site, self._selection[site.node]))
        return moments

    def goal(self, t: float) -> dict[str, _Goal]:
        """The per-channel goal statistics at ``t``: interpolated means, stds and rms."""
        goals = {}
        for site in self.sites:
            a, b = (moments[site.node] for moments in self.endpoint_moments)
            goals[site.node] = _Goal(
                mean=(1 - t) * a.mean() + t * b.mean(),
                std=(1 - t) * a.std() + t * b.std(),
                rms=(1 - t) * a.second().sqrt() + t * b.second().sqrt(),
            )
        return goals

    def variance_ratio(self, t: float = 0.5) -> dict[str, float]:
        """Variance collapse of the plain interpolated network at ``t``, per site.

        Returns:
            Site node -> mean over its channels of ``std of theta(t)`` over the goal
            ``(1 - t) s_A + t s_B`` (1: no collapse; Jordan et al. report about 0.5 and less in
            the deep layers of plain-interpolated aligned networks without BatchNorm).
        """
        moments = self._moments(interpolate_state_dicts(self.state_dict_a, self.state_dict_b, t))
        goals = self.goal(t)
        return {node: float((m.std() / goals[node].std.clamp_min(1e-12)).mean()) for node, m in moments.items()}

    def __call__(self, state_dict: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
        """The repaired version of ``state_dict``, the interpolated model at ``t``."""
        return self.correct(state_dict, t).state_dict

    def repair(self, t: float = 0.5) -> RepairResult:
        """Interpolate A and B at ``t`` and repair the result."""
        return self.correct(interpolate_state_dicts(self.state_dict_a, self.state_dict_b, t), t)

    def correct(self, state_dict: Mapping[str, torch.Tensor], t: float) -> RepairResult:
        """Repair ``state_dict`` (the interpolated model at ``t``); the input is not modified.

        One pass over the data: every site's output is renormalised with its batch statistics to
        the goal (so later sites see a corrected network) while its uncorrected statistics are
        accumulated; the accumulated statistics give the correction that is folded in.

        Returns:
            A :class:`RepairResult`.

        Raises:
            SpecError: the state dict does not fit the spec.
        """
        if not 0.0 <= t <= 1.0:
            raise AutopermError(f"REPAIR: t must be in [0, 1], got {t}")
        self.spec.check_state_dict(state_dict, "interpolated state dict")
        goals = self.goal(t)
        by_node = {site.node: site for site in self.sites}
        moments = {site.node: _Moments() for site in self.sites}

        def renormalise(node: str, value: torch.Tensor) -> torch.Tensor:
            site, goal = by_node[node], goals[node]
            count, total, squares = moments[node].add(_rows(value, site, self._selection[node]))
            if site.bias is None:
                scale = goal.rms.to(total.device) / (squares / count + self.eps).sqrt()
                shift = torch.zeros_like(scale)
            else:
                mean = total / count
                var = (squares / count - mean**2).clamp_min(0)
                scale = goal.std.to(total.device) / (var + self.eps).sqrt()
                shift = goal.mean.to(total.device) - scale * mean
            return _affine(value, site, self._channels[node], scale, shift)

        if self.sites:
            for _ in self._stream(state_dict, edit=renormalise):
                pass
        result = {name: tensor.clone() for name, tensor in state_dict.items()}
        scales, shifts, ratios = {}, {}, {}
        for site in self.sites:
            goal, measured = goals[site.node], moments[site.node]
            if site.bias is None:
                scale = goal.rms / (measured.second() + self.eps).sqrt()
                shift = torch.zeros_like(scale)
            else:
                scale = goal.std / (measured.std() ** 2 + self.eps).sqrt()
                shift = goal.mean - scale * measured.mean()
            ratios[site.node] = float((measured.std() / goal.std.clamp_min(1e-12)).mean())
            _fold(result, site, self._channels[site.node], scale, shift)
            scales[site.node], shifts[site.node] = scale.float(), shift.float()
        logger.info("REPAIR at t=%.3f: %d site(s) corrected", t, len(self.sites))
        return RepairResult(state_dict=result, t=t, sites=self.sites, scale=scales, shift=shifts, std_ratio=ratios)


def _channel_count(spec: PermutationSpec, site: RepairSite) -> int:
    return spec.shapes[site.weight][site.weight_axis] if site.weight in spec.shapes else -1


def _fold(state: dict[str, torch.Tensor], site: RepairSite, channels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``y_c -> scale_c y_c + shift_c`` folded into the site's weight and bias, in ``state``."""
    for name in (site.weight, site.bias):
        if name is not None and name not in state:
            raise SpecError(f"REPAIR: the state dict has no {name!r} (site {site.node!r})")
    weight = state[site.weight]
    factor = torch.ones(weight.shape[site.weight_axis], dtype=torch.float64)
    factor[channels] = scale
    view = [1] * weight.dim()
    view[site.weight_axis] = -1
    state[site.weight] = (weight.double() * factor.view(view).to(weight.device)).to(weight.dtype)
    if site.bias is not None:
        bias = state[site.bias].double()
        bias[channels.to(bias.device)] = scale.to(bias.device) * bias[channels.to(bias.device)] + shift.to(bias.device)
        state[site.bias] = bias.to(state[site.bias].dtype)
