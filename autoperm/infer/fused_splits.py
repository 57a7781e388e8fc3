"""Canonicalise fused projections: split along a reshape factor before the reshape, not after.

Attention written with one fused projection (timm's ``Attention``, open_clip, DINOv2, EVA)::

    qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)

splits a tensor along an axis (the ``3``) that a reshape cut out of the projection's output
axis. An axis graph has one node per tensor axis, so the ``H`` and ``D`` axes of that tensor
would be shared by q, k and v, and the value dims could not be permuted apart from the
query/key dims. This pass rewrites every such split into one chain per part that slices the
projection's output first and reshapes and permutes the slice::

    q = x_qkv[..., 0:H*D].reshape(B, N, H, D).permute(0, 2, 1, 3)      (and k, v alike)

which computes the same values, so each part gets axes of its own and the rule table sees
only slices, reshapes and permutes. A factor that is not the outermost one of its axis
(BLOOM's ``(H, 3, D)``) is split the same way after a reshape that merges it with the factors
inside it, and a reshape after the permute that keeps the split axis whole (SAM's
``reshape(3, B * H, N, D)``, heads merged with the batch) is redone on each part. Chains whose
intermediate tensors have other uses are left as they are.

The parts need not be single entries. Falcon's multi-query attention splits its heads axis
into blocks (``view(B, N, H + 2, D).split([H, 1, 1], dim=2)``: the query heads, the one key
head, the one value head), and its grouped-query layout slices and selects inside each key/
value group after two reshapes (``view(B, N, G, H / G + 2, D)``, then ``[..., :-2, :]``,
``[..., -2, :]`` and ``[..., -1, :]``). Every contiguous block (a slice, the pieces of a
``split``) becomes one piece of the projection's output axis, and a run of reshapes is read as
one reshape of the earliest tensor, so each block reaches back to the projection. A block
along the innermost factor of its axis is left to the slicing rules: no factor inside it is
shared, so its parts already get axes of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from autoperm.infer.registry import bind
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph

__all__ = ["split_fused_axes", "SYNTHETIC_PREFIX"]

SYNTHETIC_PREFIX = "autoperm_split."
"""Node names of the calls this pass adds (they are not graph nodes of the model)."""


@dataclass(frozen=True)
class _Part:
    """One user's share of the split axis: the entries ``[start, stop)``, as ``out``.

    ``keeps_axis`` is False for a user that takes one entry and drops the axis (unbind, select,
    integer indexing), True for a block that keeps it (a slice, a piece of ``split``).
    """

    start: int
    stop: int
    out: TensorRef
    keeps_axis: bool = False


@dataclass(frozen=True)
class _Chain:
    """``base -> reshape(s) -> [permute] -> source``: the calls and how the axes map.

    ``factors_at[d]`` is ``(base axis, position among its factors, factor sizes)`` for each axis
    ``d`` of ``reshaped`` (the last reshape's output) cut from one base axis, and
    ``permutation[d]`` the axis of ``reshaped`` that becomes axis ``d`` of the source.
    """

    reshapes: tuple[int, ...]
    permute: int | None
    base: TensorRef
    reshaped: TensorRef
    factors_at: dict[int, tuple[int, int, tuple[int, ...]]]
    permutation: list[int] | None


def split_fused_axes(traced: TracedGraph) -> TracedGraph:
    """Return ``traced`` with splits along reshape factors moved above the reshape (see module doc).

    Args:
        traced: the traced graph; it is not modified.

    Returns:
        A graph computing the same values, or ``traced`` itself when nothing was rewritten.
    """
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for index, call in enumerate(traced.calls):
        for tensor in call.tensors():
            consumers.setdefault(tensor.id, []).append(index)
        for tensor in call.output_tensors():
            producer[tensor.id] = index
    outputs = {ref.id for ref in traced.outputs}
    splits: dict[str, list[int]] = {}
    for index, call in enumerate(traced.calls):
        found = _split_of(call)
        if found is not None:
            splits.setdefault(found[0].id, []).append(index)
    inserted: dict[int, list[OpCall]] = {}
    removed: set[int] = set()
    for source_id, users in splits.items():
        if consumers.get(source_id) != users:  # the split tensor has other uses: keep it
            continue
        found = [_split_of(traced.calls[u]) for u in users]
        source, axis = found[0][0], found[0][1]
        if any(f[1] != axis for f in found):
            continue
        parts = [part for f in found for part in f[2]]
        node = traced.calls[users[0]].node
        done = _rewrite_chain(traced, node, source, axis, parts, producer, consumers, outputs)
        if done is None:  # a reshape after the permute that keeps the split axis (SAM: heads merged with batch)
            done = _rewrite_through_reshape(traced, node, source, axis, parts, producer, consumers, outputs)
        if done is None:
            continue
        new_calls, chain_calls = done
        inserted[users[0]] = new_calls
        removed.update(users)
        removed.update(chain_calls)
    if not inserted:
        return traced
    calls: list[OpCall] = []
    for index, call in enumerate(traced.calls):
        calls.extend(inserted.get(index, ()))
        if index not in removed:
            calls.append(call)
    return replace(traced, calls=calls)


def _rewrite_chain(traced: TracedGraph, node: str, source: TensorRef, axis: int, parts: list[_Part],
                   producer: dict[str, int], consumers: dict[str, list[int]],
                   outputs: set[str]) -> tuple[list[OpCall], list[int]] | None:
    """The rewritten calls for a split of ``source`` along ``axis`` and the chain calls they replace, or None.

    The longest run of reshapes that reaches back to a tensor the split axis is a factor of is
    tried first, so the split lands on the projection's output, not on a reshape of it.
    """
    for chain in _chains(traced, source, producer, consumers, outputs):
        cut_axis = chain.permutation[axis] if chain.permutation is not None else axis
        new_calls = _rewrite(node, chain, cut_axis, parts)
        if new_calls is not None:
            return new_calls, [*chain.reshapes, *([chain.permute] if chain.permute is not None else [])]
    return None


def _rewrite_through_reshape(traced: TracedGraph, node: str, source: TensorRef, axis: int, parts: list[_Part],
                             producer: dict[str, int], consumers: dict[str, list[int]],
                             outputs: set[str]) -> tuple[list[OpCall], list[int]] | None:
    """Like :func:`_rewrite_chain` when ``source`` is a reshape of the chain's end that keeps ``axis`` whole.

    ``qkv.permute(2, 0, 3, 1, 4).reshape(3, B * heads, N, D).unbind(0)``: each part is rewritten
    up to the permuted shape without the split axis, then reshaped as the split part was.
    """
    index = producer.get(source.id)
    if index is None or source.id in outputs:
        return None
    _, rule = bind(traced.calls[index])
    arguments = traced.calls[index].tensors()
    if rule is None or rule.family != "reshape" or len(arguments) != 1:
        return None
    middle = arguments[0]
    if middle.id in outputs or consumers.get(middle.id) != [index]:
        return None
    kept = _factors(middle.shape, source.shape)
    if kept is None or axis not in kept or kept[axis][1:] != (0, (source.shape[axis],)):
        return None
    middle_axis = kept[axis][0]
    if sum(1 for d, found in kept.items() if found[0] == middle_axis) != 1:
        return None
    labels = _labels(parts)
    staged = [
        replace(part, out=TensorRef(f"{SYNTHETIC_PREFIX}{node}.{label}.staged", _part_shape(middle.shape, middle_axis, part),
                                    floating=part.out.floating))
        for part, label in zip(parts, labels)
    ]
    done = _rewrite_chain(traced, node, middle, middle_axis, staged, producer, consumers, outputs)
    if done is None:
        return None
    new_calls, chain_calls = done
    for part, stage, label in zip(parts, staged, labels):
        new_calls.append(_op(f"{SYNTHETIC_PREFIX}{node}.{label}.merge", "aten.reshape",
                             (stage.out, list(part.out.shape)), ("input", "shape"), [part.out]))
    return new_calls, [*chain_calls, index]


def _split_of(call: OpCall) -> tuple[TensorRef, int, list[_Part]] | None:
    """``(source, axis, parts)`` for a call that reads blocks of one axis of one tensor, else None.

    Recognised: unbind, select, the pieces of split / chunk, slices with step 1, and indexing
    with one integer or one such slice (every other axis taken whole).
    """
    if call.module is not None:
        return None
    bound, rule = bind(call)
    if rule is None:
        return None
    source = bound.tensor("input")
    if source is None or not source.ndim:
        return None
    if bound.op == "unbind":
        axis = int(bound.get("dim", 0)) % source.ndim
        parts = [_Part(i, i + 1, out) for i, out in enumerate(call.outputs) if out is not None]
        return (source, axis, parts) if len(call.outputs) == source.shape[axis] else None
    if rule.family == "split":
        return _pieces(source, bound.dim("dim", source.ndim), call.outputs)
    out = call.outputs[0] if len(call.outputs) == 1 else None
    if out is None:
        return None
    if bound.op == "select" and isinstance(bound.get("index"), int):
        axis = int(bound.get("dim", 0)) % source.ndim
        index = bound.get("index") % source.shape[axis]
        return source, axis, [_Part(index, index + 1, out)]
    if bound.op == "slice":
        return _block_of(source, bound.dim("dim", source.ndim), slice(bound.get("start"), bound.get("end"), bound.get("step")), out)
    if bound.op == "getitem":
        return _indexed(source, bound.get("index"), out)
    return None


def _pieces(source: TensorRef, axis: int, outputs: Sequence[TensorRef | None]) -> tuple[TensorRef, int, list[_Part]] | None:
    """The consecutive blocks ``split`` and ``chunk`` cut ``source`` into along ``axis``."""
    parts: list[_Part] = []
    start = 0
    for out in outputs:
        if out is None or out.ndim != source.ndim or out.shape[axis] == 0:
            return None
        parts.append(_Part(start, start + out.shape[axis], out, keeps_axis=True))
        start += out.shape[axis]
    return (source, axis, parts) if parts and start == source.shape[axis] else None


def _block_of(source: TensorRef, axis: int, item: slice, out: TensorRef) -> tuple[TensorRef, int, list[_Part]] | None:
    """The block a contiguous, non-empty slice ``item`` of ``source``'s ``axis`` reads, else None."""
    if not all(isinstance(v, (int, type(None))) for v in (item.start, item.stop, item.step)) or item.step not in (None, 1):
        return None
    start, stop, _ = item.indices(source.shape[axis])
    if stop <= start or out.ndim != source.ndim or out.shape[axis] != stop - start:
        return None
    return source, axis, [_Part(start, stop, out, keeps_axis=True)]


def _indexed(source: TensorRef, index: object, out: TensorRef) -> tuple[TensorRef, int, list[_Part]] | None:
    """``source[index]`` where ``index`` takes one integer or one contiguous slice of one axis and
    every other axis whole (``qkv[1]``, ``grouped[..., :-2, :]``), else None."""
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1 or not all(i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool) for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (source.ndim - len(items) + 1) + items[at + 1:]
    if len(items) > source.ndim:
        return None
    chosen = [(axis, item) for axis, item in enumerate(items) if not _whole(item)]
    if len(chosen) != 1:
        return None
    axis, item = chosen[0]
    if isinstance(item, int):
        if not -source.shape[axis] <= item < source.shape[axis]:
            return None
        position = item % source.shape[axis]
        return source, axis, [_Part(position, position + 1, out)]
    return _block_of(source, axis, item, out)


def _whole(item: object) -> bool:
    return isinstance(item, slice) and item.start in (None, 0) and item.stop is None and item.step in (None, 1)


def _chains(traced: TracedGraph, source: TensorRef, producer: dict[str, int], consumers: dict[str, list[int]],
            outputs: set[str]) -> list[_Chain]:
    """Every ``base -> reshape(s) -> [permute] -> source`` with single-use intermediate tensors,
    the longest run of reshapes first (a run of reshapes is one reshape of its first input)."""
    index = producer.get(source.id)
    if index is None or source.id in outputs:
        return []
    permutation = None
    permute_index = None
    bound, rule = bind(traced.calls[index])
    if bound.op in ("permute", "transpose"):
        permutation = _permutation(bound, source.ndim)
        if permutation is None:
            return []
        permute_index = index
        inner = bound.tensor("input")
        if inner is None or inner.id in outputs or consumers.get(inner.id) != [index]:
            return []
        index = producer.get(inner.id)
        if index is None:
            return []
    reshaped = None
    reshapes: list[int] = []
    chains: list[_Chain] = []
    while index is not None:
        rule = bind(traced.calls[index])[1]
        arguments = traced.calls[index].tensors()
        if rule is None or rule.family != "reshape" or len(arguments) != 1 or traced.calls[index].outputs[0] is None:
            break
        if reshaped is None:
            reshaped = traced.calls[index].outputs[0]
        reshapes.append(index)
        base = arguments[0]
        factors_at = _factors(base.shape, reshaped.shape)
        if factors_at is not None:
            chains.append(_Chain(tuple(reshapes), permute_index, base, reshaped, factors_at, permutation))
        if base.id in outputs or consumers.get(base.id) != [index]:
            break
        index = producer.get(base.id)
    return chains[::-1]


def _permutation(bound, ndim: int) -> list[int] | None:
    if bound.op == "permute":
        try:
            dims = bound.dims("dims", ndim, spread=True)
        except (TypeError, ValueError):  # symbolic dims
            return None
        return dims if dims is not None and len(dims) == ndim else None
    first, second = bound.get("dim0"), bound.get("dim1")
    if first is None and len(bound.varargs) >= 2:
        first, second = bound.varargs[:2]
    if not isinstance(first, int) or not isinstance(second, int):
        return None
    order = list(range(ndim))
    order[first % ndim], order[second % ndim] = order[second % ndim], order[first % ndim]
    return order


def _factors(base: Sequence[int], shape: Sequence[int]) -> dict[int, tuple[int, int, tuple[int, ...]]] | None:
    """Map each reshape output axis cut from one base axis to ``(base axis, position, factor sizes)``.

    The two shapes are aligned into runs of equal products (axes of size 1 pass over). A run of
    output axes that comes from one base axis is recorded; output axes of a run that merges base
    axes (``(B, H, W, C) -> (B, H * W, 3, heads, D)``) are left out, so they are never the
    split axis. ``None`` if the shapes do not align.
    """
    result: dict[int, tuple[int, int, tuple[int, ...]]] = {}
    i = j = 0
    while True:
        while i < len(base) and base[i] == 1:
            i += 1
        while j < len(shape) and shape[j] == 1:
            j += 1
        if i == len(base) or j == len(shape):
            break
        run_base, run_out = [i], [j]
        left, right = base[i], shape[j]
        i, j = i + 1, j + 1
        while left != right:
            if left < right:
                if i == len(base):
                    return None
                left *= base[i]
                run_base.append(i)
                i += 1
            else:
                if j == len(shape):
                    return None
                right *= shape[j]
                run_out.append(j)
                j += 1
        merged = [b for b in run_base if base[b] != 1]
        if len(merged) == 1:
            cut = [d for d in run_out if shape[d] != 1]
            sizes = tuple(shape[d] for d in cut)
            for position, d in enumerate(cut):
                result[d] = (merged[0], position, sizes)
    rest_base = all(size == 1 for size in base[i:])
    rest_shape = all(size == 1 for size in shape[j:])
    return result if rest_base and rest_shape else None


def _rewrite(node: str, chain: _Chain, cut_axis: int, parts: list[_Part]) -> list[OpCall] | None:
    """One split of the base axis into the parts' blocks (and the gaps between them), then a
    reshape (and permute) per part, ending in the part's tensor; None where that cannot be done."""
    if cut_axis not in chain.factors_at:
        return None
    base, reshaped, permutation = chain.base, chain.reshaped, chain.permutation
    base_axis, position, sizes = chain.factors_at[cut_axis]
    if len(sizes) < 2:
        return None
    outer = math.prod(sizes[:position])
    inner = math.prod(sizes[position + 1:])
    count = sizes[position]
    if inner == 1 and any(part.keeps_axis for part in parts):  # the innermost factor: slicing it shares nothing
        return None
    blocks = _blocks(parts, count)
    if blocks is None:
        return None
    calls: list[OpCall] = []
    name = f"{SYNTHETIC_PREFIX}{node}"
    source, split_axis = base, base_axis
    if outer > 1:
        merged = (*base.shape[:base_axis], outer, count * inner, *base.shape[base_axis + 1:])
        source = TensorRef(f"{name}.grouped", merged, floating=base.floating)
        calls.append(_op(f"{name}.grouped", "aten.reshape", (base, list(merged)), ("input", "shape"), [source]))
        split_axis = base_axis + 1
    pieces = [
        TensorRef(f"{name}.split[{i}]", (*source.shape[:split_axis], (stop - start) * inner, *source.shape[split_axis + 1:]),
                  floating=base.floating)
        for i, (start, stop) in enumerate(blocks)
    ]
    calls.append(_op(f"{name}.split", "aten.split_with_sizes",
                     (source, [(stop - start) * inner for start, stop in blocks], split_axis), ("input", "sizes", "dim"), pieces))
    for part, label in zip(parts, _labels(parts)):
        piece = pieces[blocks.index((part.start, part.stop))]
        part_shape = _part_shape(reshaped.shape, cut_axis, part)
        if permutation is None:
            if part.out.shape != part_shape:
                return None
            calls.append(_op(f"{name}.{label}.reshape", "aten.reshape", (piece, list(part_shape)), ("input", "shape"), [part.out]))
            continue
        shaped = TensorRef(f"{name}.{label}.reshape", part_shape, floating=base.floating)
        calls.append(_op(f"{name}.{label}.reshape", "aten.reshape", (piece, list(part_shape)), ("input", "shape"), [shaped]))
        order = list(permutation) if part.keeps_axis else [d - (d > cut_axis) for d in permutation if d != cut_axis]
        if tuple(part_shape[d] for d in order) != part.out.shape:
            return None
        calls.append(_op(f"{name}.{label}.permute", "aten.permute", (shaped, order), ("input", "dims"), [part.out]))
    return calls


def _blocks(parts: list[_Part], count: int) -> list[tuple[int, int]] | None:
    """The parts' blocks in order, with the gaps between them filled; None if two blocks overlap."""
    used = sorted({(part.start, part.stop) for part in parts})
    blocks: list[tuple[int, int]] = []
    at = 0
    for start, stop in used:
        if start < at or stop > count:
            return None
        if start > at:
            blocks.append((at, start))
        blocks.append((start, stop))
        at = stop
    if at < count:
        blocks.append((at, count))
    return blocks


def _part_shape(shape: Sequence[int], axis: int, part: _Part) -> tuple[int, ...]:
    """``shape`` with ``axis`` cut to the part's block, or dropped where the part drops it."""
    if part.keeps_axis:
        return (*shape[:axis], part.stop - part.start, *shape[axis + 1:])
    return tuple(size for d, size in enumerate(shape) if d != axis)


def _labels(parts: list[_Part]) -> list[str]:
    """A distinct name for each part: its entry (``1``) or block (``0:2``)."""
    labels: list[str] = []
    for number, part in enumerate(parts):
        label = f"{part.start}:{part.stop}" if part.keeps_axis else str(part.start)
        labels.append(label if label not in labels else f"{label}#{number}")
    return labels


def _op(node: str, key: str, args: tuple, arg_names: tuple[str, ...], outs: list[TensorRef]) -> OpCall:
    return OpCall(node, key, key, args, {}, list(outs), arg_names=arg_names)
