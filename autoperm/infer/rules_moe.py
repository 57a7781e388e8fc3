"""Rules for top-k routing: the expert numbers a router picks, and the ops that read them.

A mixture-of-experts block scores every token against every expert (a linear layer whose rows
are the experts), keeps the ``k`` best with ``topk`` and runs the chosen experts, whose weights
are stacked along a leading expert axis and read with the chosen numbers::

    logits = x @ router.T                      # (tokens, experts)
    weights, chosen = logits.softmax(-1).topk(k)
    out = sum_k weights[:, k] * expert(gate_up_proj[chosen[:, k]], down_proj[chosen[:, k]], x)

The numbers ``topk`` returns are positions along the expert axis of its input: *labels* of that
axis. Permuting the experts (the router's rows and the stacked weights together) relabels them,
and an op that reads a tensor along its expert axis at those labels (indexing, ``gather``,
``scatter``) reads the same entries as before. So the axis a reader reads is coupled with the
axis the labels come from, and ``topk`` itself constrains neither: its values do not change
when its input is permuted along the axis it ranks.

This holds only when every use of the labels is such a read. :func:`label_axis` follows the
labels from ``topk`` through the ops that pass integer values on unchanged (tuple elements,
reshapes, slices, integer casts, copies) to their readers; any other use (arithmetic on the labels,
``one_hot``, a model output) keeps the ranked axis fixed, as it was before these rules.

``topk(..., sorted=False)`` returns the same set in an order of the kernel's choosing, which can
change when the input is permuted. Its outputs are taken as the sorted ones are; every router
(Mixtral, Qwen2-MoE, DeepSeek) only sums over those positions.

transformers 5 runs experts through an interface chosen in the config. The ``"grouped_mm"``
kernel (the default) sorts tokens by expert and multiplies contiguous runs, which no per-op
rule can follow; :func:`traceable_experts` switches the experts to ``"batched_mm"`` (read the
weights at the labels, then ``bmm``) while the model is traced. Both compute the same function.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch import nn

from autoperm.infer.context import RuleContext
from autoperm.infer.registry import BoundCall, bind, define_rule, library_aliases
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph

__all__ = ["TRACEABLE_EXPERTS_IMPLEMENTATION", "label_axis", "label_rows", "ranked_axis", "traceable_experts"]

TRACEABLE_EXPERTS_IMPLEMENTATION = "batched_mm"
"""The transformers experts implementation traced in place of the configured one."""

_PASSING = {"to", "_to_copy", "long", "int", "clone", "contiguous", "detach", "alias", "lift_fresh_copy", "select", "slice",
            "narrow"}
"""Ops that pass some or all of an integer tensor's values on unchanged (to an integer output),
besides the reshapes and broadcasts."""

_FIELDS = {"values": 0, "indices": 1}
"""Fields of the named tuple ``topk`` returns (``x.topk(k).indices``), by position."""

_SHAPE_ONLY = {"shape_query", "constant_factory"}
"""Rule families whose ops read a tensor's shape, dtype or device and not its values."""


# ------------------------------------------------------------------------------- labels
def label_axis(ctx: RuleContext, labels: TensorRef) -> Hashable | None:
    """The axis-graph node whose positions the integer values of ``labels`` are, else ``None``.

    ``labels`` must come from the indices of a ``topk`` (through tuple elements, reshapes and
    integer casts), and every use of those indices must read a tensor at them
    (:func:`_reader`) along an axis as long as the ranked one.

    Args:
        ctx: the rule context of the call being handled.
        labels: an integer tensor of the traced graph.

    Returns:
        The node of the ranked axis of the ``topk`` input, or ``None`` when ``labels`` are no
        such positions or some use of them is not understood.
    """
    found = _label_flow(ctx.traced).source.get(labels.id)
    return None if found is None else ranked_axis(ctx, *found)


def ranked_axis(ctx: RuleContext, ranked: TensorRef, dim: int) -> Hashable | None:
    """The node of axis ``dim`` of ``ranked`` when every use of the ``topk`` positions along it
    is understood (or there is none), else ``None``."""
    key = (ranked.id, dim % ranked.ndim)
    if not _label_flow(ctx.traced).sound.get(key, False):
        return None
    return ctx.axes.node(key, ranked.shape[key[1]])


class _LabelFlow:
    """Where the indices of each ``topk`` of a graph go: the tensors holding them, and whether
    every use of them reads along an axis as long as the ranked one."""

    def __init__(self, traced: TracedGraph) -> None:
        self.source: dict[str, tuple[TensorRef, int]] = {}  # label tensor id -> (ranked tensor, ranked axis)
        self.sound: dict[tuple[str, int], bool] = {}
        self.rows: dict[tuple[str, int], tuple[tuple[str, int], str]] = {}  # see label_rows
        consumers: dict[str, list[OpCall]] = {}
        for call in traced.calls:
            for tensor in {t.id: t for t in call.tensors()}.values():
                consumers.setdefault(tensor.id, []).append(call)
        outputs = {ref.id for ref in traced.outputs}
        for call in traced.calls:
            bound, rule = bind(call)
            if rule is None or rule.name != "topk":
                continue
            ranked = bound.tensor("input")
            outs = call.outputs
            if ranked is None or not ranked.ndim or len(outs) != 2 or outs[1] is None:
                continue
            dim = bound.dim("dim", ranked.ndim, -1)
            key = (ranked.id, dim)
            sound = True
            pending = [outs[1]]
            while pending:
                tensor = pending.pop()
                self.source[tensor.id] = (ranked, dim)
                if tensor.id in outputs or tensor.floating:
                    sound = False
                for consumer in consumers.get(tensor.id, ()):
                    use = _use(consumer, tensor, ranked.shape[dim])
                    if use is None:
                        sound = False
                    else:
                        pending.extend(use)
                        self._record_rows(consumer, tensor, key)
            self.sound[key] = self.sound.get(key, True) and sound


    def _record_rows(self, call: OpCall, labels: TensorRef, ranked: tuple[str, int]) -> None:
        """Record the output axis of ``x[labels]`` (one-dimensional labels, indexing one axis) as rows
        labelled by the ``topk`` positions along ``ranked``."""
        bound, rule = bind(call)
        if rule is None or rule.name not in ("getitem", "index_tensor") or labels.ndim != 1 or not call.outputs:
            return
        read, out = _reader(bound, rule.name), call.outputs[0]
        if read is None or read[1].id != labels.id or out is None or out.ndim != read[0].ndim:
            return
        self.rows[(out.id, read[2])] = (ranked, labels.id)


def label_rows(ctx: RuleContext) -> dict[tuple[str, int], tuple[Hashable, str]]:
    """Axes whose positions each belong to one label: row ``r`` of ``x[labels]`` along the read axis
    is entry ``labels[r]`` of ``x`` (the expert a token's copy is sent to).

    Only the reads of understood ``topk`` positions (:func:`ranked_axis`) with one-dimensional
    labels are listed.

    Returns:
        ``{(tensor id, axis): (axis-graph node of the ranked axis, id of the labels tensor)}``.
    """
    flow = _label_flow(ctx.traced)
    return {row: (ranked, labels) for row, (ranked, labels) in flow.rows.items() if flow.sound.get(ranked, False)}


_LAST_FLOW: list[tuple[weakref.ref[TracedGraph], _LabelFlow]] = []
"""The label flow of the graph handled last (rules see one graph at a time, many times over);
the graph is held weakly so that its modules are not kept alive."""


def _label_flow(traced: TracedGraph) -> _LabelFlow:
    """The label flow of ``traced``, computed once per graph."""
    if not _LAST_FLOW or _LAST_FLOW[0][0]() is not traced:
        _LAST_FLOW[:] = [(weakref.ref(traced), _LabelFlow(traced))]
    return _LAST_FLOW[0][1]


def _use(call: OpCall, labels: TensorRef, length: int) -> list[TensorRef] | None:
    """How ``call`` uses ``labels``: the tensors it passes them on to (empty for a reader or a
    use of the shape alone), or ``None`` for a use that is not understood."""
    bound, rule = bind(call)
    if rule is None:
        return None
    if rule.family in _SHAPE_ONLY:
        return []
    out = call.outputs[0] if call.outputs else None
    if rule.name in ("getitem", "getattr") and isinstance(bound.get("input"), (list, tuple)):  # a tuple element
        source = bound.get("input")
        index = bound.get("index") if rule.name == "getitem" else _FIELDS.get(bound.get("name"))
        if not isinstance(index, int) or not -len(source) <= index < len(source):
            return None
        chosen = source[index]
        return [out] if isinstance(chosen, TensorRef) and chosen.id == labels.id and out is not None else []
    tensors = bound.tensors()
    if sum(tensor.id == labels.id for tensor in tensors) > 1:  # x[x], x.gather(0, x): the labels read themselves
        return None
    first = tensors[0] if tensors else None
    passes = (rule.family in ("reshape", "expand") or rule.name in _PASSING and _keeps_integers(call)
              or rule.name == "getitem" and _basic(bound.get("index")))
    if passes and first is not None and first.id == labels.id and out is not None and not out.floating:
        return [out]
    read = _reader(bound, rule.name)
    if read is not None and read[1].id == labels.id and read[0].shape[read[2]] == length:
        return []
    return None


def _reader(call: BoundCall, name: str) -> tuple[TensorRef, TensorRef, int] | None:
    """``(tensor, labels, axis)`` when ``call`` reads ``tensor`` along ``axis`` at the values of
    integer tensor ``labels`` (advanced indexing with one index tensor, ``gather``, ``scatter``)."""
    if name in ("gather", "scatter", "scatter_add"):
        x, index = call.tensor("input"), call.tensor("index")
        if x is None or index is None or index.floating or not x.ndim:
            return None
        return x, index, call.dim("dim", x.ndim)
    if name in ("getitem", "index_tensor"):
        x = call.tensor("input")
        items = call.get("indices") if name == "index_tensor" else call.get("index")
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        tensors = [(position, item) for position, item in enumerate(items) if isinstance(item, TensorRef)]
        whole = all(item is None or isinstance(item, TensorRef) or _is_full(item) for item in items)
        if x is None or len(tensors) != 1 or not whole or len(items) > x.ndim or tensors[0][1].floating:
            return None
        return x, tensors[0][1], tensors[0][0]
    return None


def _keeps_integers(call: OpCall) -> bool:
    """Whether a cast converts to no dtype other than 32- or 64-bit integers (a boolean mask is no labels)."""
    dtypes = [value for value in (*call.args, *call.kwargs.values()) if isinstance(value, torch.dtype)]
    return all(dtype in (torch.int64, torch.int32) for dtype in dtypes)


def _basic(index: object) -> bool:
    """Whether ``index`` is basic indexing (integers, slices, ``None``, ``...``): it picks entries, reads no tensor."""
    items = index if isinstance(index, tuple) else (index,)
    return all(item is None or item is Ellipsis or isinstance(item, (int, slice)) for item in items)


def _is_full(item: object) -> bool:
    return isinstance(item, slice) and item.start in (None, 0) and item.stop is None and item.step in (None, 1)


# -------------------------------------------------------------------------------- rules
def _topk(ctx: RuleContext, call: BoundCall) -> None:
    """``values, indices = x.topk(k, dim)``: with understood indices, the ranked axis is free.

    The other axes of ``x`` are coupled with those of both outputs; the ``k`` positions are
    fixed. When some use of the indices is not understood, every axis stays fixed.
    """
    x = call.tensor("input")
    outputs = call.call.output_tensors()
    if x is None or not x.ndim:
        return
    dim = call.dim("dim", x.ndim, -1)
    if ranked_axis(ctx, x, dim) is None or any(out.ndim != x.ndim for out in outputs):
        for out in outputs:
            ctx.unknown([x, out])
        return
    ctx.free(x, dim)
    for out in outputs:
        ctx.fix(out, dim)
        for d in range(x.ndim):
            if d != dim:
                ctx.same(x, d, out, d)


def _gather(ctx: RuleContext, call: BoundCall) -> None:
    """``out = x.gather(dim, labels)``: ``out[i][j] = x[i][labels[i][j]]`` (for ``dim = 1``).

    The axis read is coupled with the axis the labels come from; every other axis of ``x``,
    ``labels`` and ``out`` with the same axis of the others when their lengths agree, else all
    are fixed. Indices that are no understood labels keep every axis fixed.
    """
    read = _reader(call, "gather")
    out = call.out
    if read is None or out is None:
        ctx.unknown([*call.tensors(), *call.call.output_tensors()])
        return
    x, labels, dim = read
    labelled = label_axis(ctx, labels)
    if labelled is None or ctx.size(labelled) != x.shape[dim] or not _aligned([x, labels, out], dim):
        ctx.unknown([x, labels, out])
        return
    ctx.same_node(ctx.ax(x, dim), labelled)
    ctx.same(labels, dim, out, dim)
    for d in range(x.ndim):
        if d != dim:
            ctx.same(x, d, labels, d)
            ctx.same(x, d, out, d)


def _scatter(ctx: RuleContext, call: BoundCall) -> None:
    """``out = x.scatter(dim, labels, src)``: ``x`` with ``out[i][labels[i][j]] = src[i][j]``.

    The written axis of ``x`` and ``out`` is coupled with the axis the labels come from (``x``
    permuted along it and the labels relabelled give ``out`` permuted along it); the other axes
    as in :func:`_gather`. Indices that are no understood labels keep every axis fixed.
    """
    read = _reader(call, "scatter")
    out = call.out
    src = call.get("src", call.get("value"))
    if read is None or out is None:
        ctx.unknown([*call.tensors(), *call.call.output_tensors()])
        return
    x, labels, dim = read
    labelled = label_axis(ctx, labels)
    sources = [src] if isinstance(src, TensorRef) else []
    if (labelled is None or ctx.size(labelled) != x.shape[dim] or out.shape != x.shape
            or any(s.shape != labels.shape for s in sources) or not _aligned([x, labels], dim)):
        ctx.unknown([x, labels, out, *sources])
        return
    ctx.same_node(ctx.ax(x, dim), labelled)
    ctx.same(x, dim, out, dim)
    for source in sources:
        ctx.same_all(labels, source)
    for d in range(x.ndim):
        if d != dim:
            ctx.same(x, d, labels, d)
            ctx.same(x, d, out, d)


def _aligned(tensors: list[TensorRef], dim: int) -> bool:
    """Whether ``tensors`` have one rank and equal lengths on every axis but ``dim``."""
    first = tensors[0]
    return all(t.ndim == first.ndim and all(t.shape[d] == first.shape[d] for d in range(first.ndim) if d != dim) for t in tensors)


define_rule("topk", aliases=library_aliases("topk"), args=("input", "k", "dim", "largest", "sorted"),
            family="position_reduction")(_topk)
define_rule("gather", aliases=library_aliases("gather"), args=("input", "dim", "index"))(_gather)
for _name in ("scatter", "scatter_", "scatter_add", "scatter_add_"):
    define_rule(_name.rstrip("_"), aliases=library_aliases(_name), args=("input", "dim", "index", "src"))(_scatter)


# ---------------------------------------------------------------------- transformers experts
def _is_transformers_experts(module: nn.Module) -> bool:
    """Whether ``module`` runs through transformers' experts interface (``@use_experts_implementation``)."""
    config = getattr(module, "config", None)
    return (config is not None and hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and hasattr(type(config), "_experts_implementation"))


@contextlib.contextmanager
def traceable_experts(model: nn.Module) -> Iterator[None]:
    """Within the block, transformers experts modules of ``model`` run as ``"batched_mm"``.

    The configs' own choice is restored on leaving; the model's weights are not touched.

    Args:
        model: any module; modules that are no transformers experts are left alone.
    """
    saved: list[tuple[Any, Any]] = []
    try:
        for module in model.modules():
            if _is_transformers_experts(module):
                config = module.config
                if config._experts_implementation != TRACEABLE_EXPERTS_IMPLEMENTATION and not any(c is config for c, _ in saved):
                    saved.append((config, config._experts_implementation))
                    config._experts_implementation = TRACEABLE_EXPERTS_IMPLEMENTATION
        yield
    finally:
        for config, implementation in reversed(saved):
            config._experts_implementation = implementation

