"""Affine sites: the layer calls whose output channels carry a per-channel scale and shift.

A site is a call whose rule states an affine layout (:attr:`OpRule.affine`: ``nn.Linear``,
``ConvNd``, BatchNorm, LayerNorm, GroupNorm, RMSNorm, their functional / ATen forms, ``addmm`` as
written by Hugging Face's ``Conv1D``) and whose weight's output axis some group moves. REPAIR
(Jordan et al., arXiv 2211.08403) renormalises their channels and folds the correction into the
weight and bias; inference records them in the spec (``PermutationSpec.affine_sites``) so that
REPAIR never looks at the graph.
"""

from __future__ import annotations

import logging
from collections import Counter

from autoperm.infer.context import AffineLayout
from autoperm.infer.registry import bind
from autoperm.spec.schema import AffineSite
from autoperm.trace.graph import TracedGraph

__all__ = ["affine_sites"]

logger = logging.getLogger(__name__)


def affine_sites(traced: TracedGraph, layouts: dict[str, AffineLayout], moved: set[tuple[str, int]]) -> tuple[AffineSite, ...]:
    """The affine sites of ``traced`` whose weight's output axis some group moves.

    A layer whose output goes only into norm sites (a conv feeding its BatchNorm) records those
    norms in ``feeds``: REPAIR corrects the norm instead. A weight used by several calls is left
    out (one fold cannot serve two different corrections).

    Args:
        traced: the traced graph the spec is inferred from.
        layouts: node -> the affine layout its rule stated (``RuleContext.affine``).
        moved: the ``(state-dict name, axis)`` pairs that group members move.

    Returns:
        The sites, in graph order.
    """
    candidates: list[AffineSite] = []
    consumers: dict[str, set[str]] = {}
    for call in traced.calls:
        for ref in call.tensors():
            consumers.setdefault(ref.id, set()).add(call.node)
        layout, outputs = layouts.get(call.node), call.output_tensors()
        if layout is None or len(call.outputs) != 1 or not outputs or not outputs[0].floating or outputs[0].ndim < 1:
            continue
        weight = traced.state.get(traced.aliases.get(layout.weight, layout.weight))
        if weight is None or outputs[0].shape[layout.channel_axis] != weight.shape[layout.weight_axis]:
            continue
        if (layout.weight, layout.weight_axis) in moved:
            candidates.append(AffineSite(node=call.node, module=call.module_name if call.module is not None else None,
                                         kind=bind(call)[0].op, **layout._asdict()))
    uses = Counter(traced.aliases.get(site.weight, site.weight) for site in candidates)
    norms = {site.node for site in candidates if site.norm}
    sites = []
    for site in candidates:
        if uses[traced.aliases.get(site.weight, site.weight)] > 1:
            logger.info("%s is used by several calls; REPAIR leaves its channels uncorrected", site.weight)
            continue
        readers = consumers.get(site.node, set())
        feeds = tuple(sorted(readers)) if readers and readers <= norms and not site.norm else ()
        sites.append(site.model_copy(update={"feeds": feeds}) if feeds else site)
    return tuple(sites)
