"""Affine sites: the layer calls whose output channels carry a per-channel scale and shift.

A site is a call of a layer with a per-channel affine on its output (``nn.Linear``, ``ConvNd``,
BatchNorm, LayerNorm, GroupNorm, RMSNorm, or their functional / ATen forms, including ``addmm`` as
written by Hugging Face's ``Conv1D``) whose weight's output axis some group moves. REPAIR
(Jordan et al., arXiv 2211.08403) renormalises the channels of these calls and folds the
correction into their weight and bias; inference records them in the spec
(:attr:`autoperm.PermutationSpec.affine_sites`) so that REPAIR never looks at the graph.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from autoperm.infer.fused_splits import SYNTHETIC_PREFIX
from autoperm.infer.registry import BoundCall, bind
from autoperm.spec.schema import AffineSite, Member
from autoperm.trace.graph import TracedGraph

__all__ = ["affine_sites"]

logger = logging.getLogger(__name__)

NORM_OPS = frozenset({"batch_norm", "layer_norm", "group_norm", "rms_norm", "instance_norm"})
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _state_name(value: Any) -> str | None:
    return getattr(value, "state_name", None)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__ == "RMSNorm"


def _describe_module(module: nn.Module, prefix: str) -> tuple[int, str, int, str | None] | None:
    """``(channel axis, weight, weight axis, bias)`` of a module call with a per-channel affine."""
    bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Linear):
        return -1, f"{prefix}weight", 0, bias
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return (1, f"{prefix}weight", 1, bias) if module.groups == 1 else None
        return 1, f"{prefix}weight", 0, bias
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1, f"{prefix}weight", 0, bias
    if (isinstance(module, nn.LayerNorm) or _is_rms_norm(module)) and weight.dim() == 1:
        return -1, f"{prefix}weight", 0, bias
    return None


def _describe_function(bound: BoundCall) -> tuple[int, str, int, str | None] | None:
    """``(channel axis, weight, weight axis, bias)`` of a functional call with a per-channel affine."""
    op = bound.op
    if op == "linear":
        weight = _state_name(bound.get("weight"))
        return (-1, weight, 0, _state_name(bound.get("bias"))) if weight else None
    if op in ("conv", "convolution"):
        weight = _state_name(bound.get("weight"))
        if not weight or bound.get("transposed", False):
            return None
        return 1, weight, 0, _state_name(bound.get("bias"))
    if op == "addmm":  # input + mat1 @ mat2 with mat2 an (in, out) weight (Hugging Face Conv1D)
        weight = _state_name(bound.get("mat2"))
        bias = bound.get("input")
        if not weight or _state_name(bound.get("mat1")) or (bias is not None and not _state_name(bias)):
            return None
        return -1, weight, 1, _state_name(bias)
    if op in NORM_OPS:
        weight = _state_name(bound.get("weight"))
        if not weight:
            return None
        return (-1 if op in ("layer_norm", "rms_norm") else 1), weight, 0, _state_name(bound.get("bias"))
    return None


def affine_sites(traced: TracedGraph, members: dict[str, list[Member]]) -> tuple[AffineSite, ...]:
    """The affine sites of ``traced`` whose weight's output axis some group member moves.

    A layer whose output goes only into norm sites (a conv feeding its BatchNorm) records those
    norms in ``feeds``: REPAIR corrects the norm instead. A weight used by several calls is left
    out (one fold cannot serve two different corrections).

    Args:
        traced: the traced graph the spec is inferred from.
        members: state-dict name -> the group members on that tensor.

    Returns:
        The sites, in graph order.
    """
    candidates: list[AffineSite] = []
    consumers: dict[str, set[str]] = {}
    weight_uses: dict[str, int] = {}
    for call in traced.calls:
        for ref in call.tensors():
            consumers.setdefault(ref.id, set()).add(call.node)
        outputs = call.output_tensors()
        if call.node.startswith(SYNTHETIC_PREFIX) or len(call.outputs) != 1 or not outputs or not outputs[0].floating:
            continue
        bound = bind(call)[0]
        if call.module is not None:
            described = _describe_module(call.module, f"{call.module_name}." if call.module_name else "")
            norm = isinstance(call.module, _NORM_MODULES) or _is_rms_norm(call.module)
        else:
            described = _describe_function(bound)
            norm = bound.op in NORM_OPS
        if described is None:
            continue
        channel_axis, weight, weight_axis, bias = described
        out = outputs[0]
        weight_ref = traced.state.get(traced.aliases.get(weight, weight))
        if out.ndim < 1 or weight_ref is None or out.shape[channel_axis] != weight_ref.shape[weight_axis]:
            continue
        if not any(member.axis == weight_axis for member in members.get(weight, ())):
            continue
        candidates.append(AffineSite(
            node=call.node, module=call.module_name if call.module is not None else None, kind=bound.op,
            channel_axis=channel_axis, weight=weight, weight_axis=weight_axis, bias=bias, norm=norm,
        ))
        key = traced.aliases.get(weight, weight)
        weight_uses[key] = weight_uses.get(key, 0) + 1
    norms = {site.node for site in candidates if site.norm}
    sites = []
    for site in candidates:
        if weight_uses[traced.aliases.get(site.weight, site.weight)] > 1:
            logger.info("%s is used by several calls; REPAIR leaves its channels uncorrected", site.weight)
            continue
        users = consumers.get(site.node, set())
        feeds = tuple(sorted(users)) if users and users <= norms and not site.norm else ()
        sites.append(site.model_copy(update={"feeds": feeds}) if feeds else site)
    return tuple(sites)
