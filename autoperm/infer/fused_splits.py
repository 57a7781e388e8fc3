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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from autoperm.infer.registry import bind
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph

__all__ = ["split_fused_axes", "SYNTHETIC_PREFIX"]

SYNTHETIC_PREFIX = "autoperm_split."
"""Node names of the calls this pass adds (they are not graph nodes of the model)."""


def split_fused_axes(traced: TracedGraph) -> TracedGraph:
    """Return ``traced`` with splits along reshape factors moved above the reshape (see module doc)."""
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


def _rewrite_chain(traced: TracedGraph, node: str, source: TensorRef, axis: int, parts: list[tuple[int, TensorRef]],
                   producer: dict[str, int], consumers: dict[str, list[int]], outputs: set[str]):
    """The rewritten calls for a split of ``source`` along ``axis`` and the chain calls they replace, or None."""
    chain = _chain(traced, source, producer, consumers, outputs)
    if chain is None:
        return None
    reshape_index, permute_index, base, factors_at, permutation = chain
    reshaped = traced.calls[reshape_index].outputs[0]
    cut_axis = permutation[axis] if permutation is not None else axis
    new_calls = _rewrite(node, base, reshaped, factors_at, cut_axis, permutation, parts)
    if new_calls is None:
        return None
    return new_calls, [i for i in (reshape_index, permute_index) if i is not None]


def _rewrite_through_reshape(traced: TracedGraph, node: str, source: TensorRef, axis: int,
                             parts: list[tuple[int, TensorRef]], producer: dict[str, int],
                             consumers: dict[str, list[int]], outputs: set[str]):
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
    part_shape = tuple(size for d, size in enumerate(middle.shape) if d != middle_axis)
    staged = [(i, TensorRef(f"{SYNTHETIC_PREFIX}{node}.{i}.staged", part_shape, floating=out.floating)) for i, out in parts]
    done = _rewrite_chain(traced, node, middle, middle_axis, staged, producer, consumers, outputs)
    if done is None:
        return None
    new_calls, chain_calls = done
    for (i, out), (_, stage) in zip(parts, staged):
        new_calls.append(_op(f"{SYNTHETIC_PREFIX}{node}.{i}.merge", "aten.reshape", (stage, list(out.shape)), ("input", "shape"), [out]))
    return new_calls, [*chain_calls, index]


def _split_of(call: OpCall) -> tuple[TensorRef, int, list[tuple[int, TensorRef]]] | None:
    """``(source, axis, [(index, part)])`` for unbind / select / integer indexing, else None."""
    if call.module is not None:
        return None
    bound, rule = bind(call)
    if rule is None:
        return None
    source = bound.tensor("input")
    if source is None:
        return None
    if bound.op == "unbind":
        axis = int(bound.get("dim", 0)) % source.ndim
        parts = [(i, out) for i, out in enumerate(call.outputs) if out is not None]
        return (source, axis, parts) if len(call.outputs) == source.shape[axis] else None
    if call.outputs and call.outputs[0] is not None:
        out = call.outputs[0]
        if bound.op == "select" and isinstance(bound.get("index"), int):
            axis = int(bound.get("dim", 0)) % source.ndim
            return source, axis, [(bound.get("index") % source.shape[axis], out)]
        if bound.op == "getitem" and isinstance(bound.get("index"), int):
            return source, 0, [(bound.get("index") % source.shape[0], out)]
    return None


def _chain(traced: TracedGraph, source: TensorRef, producer: dict[str, int], consumers: dict[str, list[int]],
           outputs: set[str]):
    """Find ``base -> reshape -> [permute] -> source`` with single-use intermediate tensors.

    Returns ``(reshape call index, permute call index or None, base tensor, factors_at,
    permutation)`` where ``factors_at[d]`` is ``(base axis, position among its factors, factor
    sizes)`` for each reshape output axis ``d`` cut from a base axis, and ``permutation[d]`` the
    reshape output axis that becomes axis ``d`` of ``source``.
    """
    index = producer.get(source.id)
    if index is None or source.id in outputs:
        return None
    permutation = None
    permute_index = None
    bound, rule = bind(traced.calls[index])
    if bound.op in ("permute", "transpose"):
        permutation = _permutation(bound, source.ndim)
        if permutation is None:
            return None
        permute_index = index
        inner = bound.tensor("input")
        if inner is None or inner.id in outputs or consumers.get(inner.id) != [index]:
            return None
        index = producer.get(inner.id)
        if index is None:
            return None
        bound, rule = bind(traced.calls[index])
    if rule is None or rule.family != "reshape":
        return None
    arguments = traced.calls[index].tensors()
    base = arguments[0] if len(arguments) == 1 else None
    reshaped = traced.calls[index].outputs[0]
    if base is None or reshaped is None:
        return None
    factors_at = _factors(base.shape, reshaped.shape)
    if factors_at is None:
        return None
    return index, permute_index, base, factors_at, permutation


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


def _rewrite(node: str, base: TensorRef, reshaped: TensorRef, factors_at, cut_axis: int,
             permutation: list[int] | None, parts: list[tuple[int, TensorRef]]) -> list[OpCall] | None:
    """One split of the base axis, then a reshape (and permute) per part, ending in the part's tensor."""
    if cut_axis not in factors_at:
        return None
    base_axis, position, sizes = factors_at[cut_axis]
    if len(sizes) < 2:
        return None
    outer = math.prod(sizes[:position])
    inner = math.prod(sizes[position + 1:])
    count = sizes[position]
    calls: list[OpCall] = []
    name = f"{SYNTHETIC_PREFIX}{node}"
    source, split_axis = base, base_axis
    if outer > 1:
        merged = (*base.shape[:base_axis], outer, count * inner, *base.shape[base_axis + 1:])
        source = TensorRef(f"{name}.grouped", merged, floating=base.floating)
        calls.append(_op(f"{name}.grouped", "aten.reshape", (base, list(merged)), ("input", "shape"), [source]))
        split_axis = base_axis + 1
    piece_shape = (*source.shape[:split_axis], inner, *source.shape[split_axis + 1:])
    pieces = [TensorRef(f"{name}.split[{i}]", piece_shape, floating=base.floating) for i in range(count)]
    calls.append(_op(f"{name}.split", "aten.split_with_sizes", (source, [inner] * count, split_axis),
                     ("input", "sizes", "dim"), pieces))
    part_shape = tuple(s for d, s in enumerate(reshaped.shape) if d != cut_axis)
    for index, out in parts:
        piece = pieces[index]
        if permutation is None:
            if out.shape != part_shape:
                return None
            calls.append(_op(f"{name}.{index}.reshape", "aten.reshape", (piece, list(part_shape)), ("input", "shape"), [out]))
            continue
        shaped = TensorRef(f"{name}.{index}.reshape", part_shape, floating=base.floating)
        calls.append(_op(f"{name}.{index}.reshape", "aten.reshape", (piece, list(part_shape)), ("input", "shape"), [shaped]))
        order = [d - (d > cut_axis) for d in permutation if d != cut_axis]
        if tuple(part_shape[d] for d in order) != out.shape:
            return None
        calls.append(_op(f"{name}.{index}.permute", "aten.permute", (shaped, order), ("input", "dims"), [out]))
    return calls


def _op(node: str, key: str, args: tuple, arg_names: tuple[str, ...], outs: list[TensorRef]) -> OpCall:
    return OpCall(node, key, key, args, {}, list(outs), arg_names=arg_names)
