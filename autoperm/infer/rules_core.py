"""Rules for elementwise, shape, reduction and indexing ops (one rule object per canonical op).

Symmetry kinds: ops that only move entries (reshape, transpose, cat, slicing), identities in
eval mode (dropout, casts between floating dtypes), sums of activations and sums over other
axes are linear and preserve invertible maps on the axes they couple; ReLU and leaky ReLU
preserve positive scales; every other op preserves permutations only.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from autoperm.infer.context import RuleContext
from autoperm.infer.registry import BoundCall, Coupling, define_rule, library_aliases, op_rule, register_module_rule, register_op_rule
from autoperm.infer.rules_moe import label_axis
from autoperm.trace.graph import TensorRef, tensors_in

# Aliases beyond those library_aliases finds from the name.
_EXTRA_ALIASES: dict[str, list[Any]] = {
    "add": [operator.add, operator.iadd], "sub": [operator.sub, operator.isub],
    "mul": [operator.mul, operator.imul], "div": [operator.truediv, operator.itruediv],
    "floor_divide": [operator.floordiv], "remainder": [operator.mod], "pow": [operator.pow],
    "eq": [operator.eq], "ne": [operator.ne], "lt": [operator.lt], "le": [operator.le],
    "gt": [operator.gt], "ge": [operator.ge], "bitwise_and": [operator.and_], "bitwise_or": [operator.or_],
    "bitwise_xor": [operator.xor], "neg": [operator.neg], "positive": [operator.pos],
    "bitwise_not": [operator.invert], "abs": [abs],
    "stochastic_depth": ["torchvision.ops.stochastic_depth.stochastic_depth"],
    "size": [len], "_check": ["torch._check"],
}


def add_ops(names: Iterable[str], couple: Coupling, args: Sequence[str] = (), family: str = "", **facts: Any) -> None:
    """One rule per canonical name in ``names``, all coupling their axes with ``couple``.

    Each rule is written every way :func:`library_aliases` finds for its name.
    """
    for name in names:
        define_rule(name, aliases=library_aliases(name, _EXTRA_ALIASES.get(name, ())), args=args, family=family or name, **facts)(couple)


# ----------------------------------------------------------------------------- elementwise
# Unary ops: only the first tensor argument is coupled to the output (``x.to(y)`` and
# ``x.type_as(y)`` take y for its dtype alone).
SCALE_ACTIVATIONS = ["relu", "relu_", "leaky_relu", "leaky_relu_"]
"""Positively homogeneous activations: ``f(c x) = c f(x)`` for ``c > 0``."""
ACTIVATIONS = [
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "softsign", "tanhshrink", "logsigmoid",
    "hardshrink", "softshrink", "rrelu", "threshold",
    "sigmoid_", "relu_", "silu_", "gelu_", "tanh_", "hardswish_", "hardtanh_", "leaky_relu_", "elu_",
]
UNARY = [
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "neg", "abs", "sin",
    "cos", "tan", "erf", "erfc", "reciprocal", "square", "sign", "sgn", "floor", "ceil", "round",
    "trunc", "frac", "logical_not", "bitwise_not", "isnan", "isinf", "isfinite", "nan_to_num",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout", "native_dropout",
    "contiguous", "clone", "detach", "detach_", "to", "_to_copy", "float", "half", "double", "bfloat16",
    "int", "long", "bool", "type", "type_as", "cpu", "cuda", "alias", "lift_fresh_copy", "requires_grad_",
    "stochastic_depth", "zero_", "fill_", "ones_like", "zeros_like", "full_like", "empty_like", "positive",
]
# Unary ops that are linear (the identity in eval mode, casts between floating dtypes, negation).
LINEAR_UNARY = [
    "neg", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "feature_dropout",
    "native_dropout", "contiguous", "clone", "detach", "detach_", "to", "_to_copy", "float", "half", "double", "bfloat16",
    "type", "type_as", "cpu", "cuda", "alias", "lift_fresh_copy", "requires_grad_", "stochastic_depth", "positive",
]
# n-ary ops with broadcasting: every tensor argument is coupled to the output.
NARY = [
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow", "rsub",
    "maximum", "minimum", "fmax", "fmin", "eq", "ne", "lt", "le", "gt", "ge", "atan2", "hypot",
    "logaddexp", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor",
    "where", "masked_fill", "masked_fill_", "clamp", "clip", "clamp_min", "clamp_max", "lerp",
    "addcmul", "addcdiv", "add_", "sub_", "mul_", "div_", "copysign", "xlogy", "isclose",
    "heaviside", "copy_",
]


def _unary(ctx: RuleContext, call: BoundCall) -> None:
    """Unary ops and broadcasts (``expand``): axes grown from size 1 hold copies and are left free.

    Floating input to floating output, the coupled axes carry the op's kinds (casts to integer
    or boolean dtypes are not linear).
    """
    tensors = call.tensors()
    for other in tensors[1:]:  # x.to(y), x.type_as(y), x.expand_as(y): y gives its dtype, device or shape only
        ctx.unread(other)
    if tensors and call.out is not None:
        ctx.elementwise([tensors[0]], call.out, carry=tensors[0].floating and call.out.floating)
        for extra in call.call.output_tensors()[1:]:  # native_dropout's mask
            ctx.elementwise([tensors[0]], extra)


def _nary(ctx: RuleContext, call: BoundCall) -> None:
    ctx.elementwise(call.tensors(), call.out)


def _additive(ctx: RuleContext, call: BoundCall) -> None:
    """``x + y`` and ``x - y`` of two tensors are linear along every axis neither broadcasts;
    with a number (``x + 1``) they are affine and preserve permutations only."""
    both = isinstance(call.get("input"), TensorRef) and isinstance(call.get("other"), TensorRef)
    ctx.elementwise(call.tensors(), call.out, carry=both)


def _scaling(ctx: RuleContext, call: BoundCall) -> None:
    """``x * c`` and ``x / c`` by a number are linear; products of two tensors (gains, gates)
    preserve permutations only."""
    if call.get("rounding_mode") is not None:  # floor / trunc division
        ctx.elementwise(call.tensors(), call.out)
        return
    number = call.get("other")
    linear = isinstance(call.get("input"), TensorRef) and isinstance(number, (int, float)) and not isinstance(number, bool)
    if not linear and call.op == "mul":  # c * x
        number = call.get("input")
        linear = isinstance(call.get("other"), TensorRef) and isinstance(number, (int, float)) and not isinstance(number, bool)
    ctx.elementwise(call.tensors(), call.out, carry=linear)


def same_shape(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The meta output of a module whose output has its input's shape and dtype."""
    return torch.empty_like(x)


_LINEAR_NARY = {"add": _additive, "sub": _additive, "add_": _additive, "sub_": _additive,
                 "mul": _scaling, "mul_": _scaling, "div": _scaling, "div_": _scaling, "true_divide": _scaling}
for _name in ACTIVATIONS:
    add_ops([_name], _unary, ("input",), activation=True, meta_output=same_shape,
            kinds={"scale"} if _name in SCALE_ACTIVATIONS else {"permutation"})
for _name in UNARY:
    add_ops([_name], _unary, ("input",), meta_output=same_shape, kinds={"invertible"} if _name in LINEAR_UNARY else {"permutation"})
for _name in NARY:
    if _name in _LINEAR_NARY:
        add_ops([_name], _LINEAR_NARY[_name], ("input", "other"), kinds={"invertible"})
    else:
        add_ops([_name], _nary, ("input", "other"))


# Normalising along one axis (softmax, F.normalize) is equivariant there, but mixes its entries.
def _softmax(ctx: RuleContext, call: BoundCall) -> None:
    tensors = call.tensors()
    x, out = (tensors[0] if tensors else None), call.out
    if x is None or out is None:
        return
    ctx.same_all(x, out)
    dim = call.get("dim")
    ctx.mixes(x, None if not isinstance(dim, int) else dim)


def _softmax_module(ctx: RuleContext, call: BoundCall) -> dict[str, Any]:
    return {"input": call.input(0), "dim": call.module.dim}


add_ops(["softmax", "log_softmax", "_softmax", "_log_softmax", "softmin", "special_softmax"], _softmax, ("input", "dim"),
        family="softmax", module_arguments=_softmax_module)
add_ops(["normalize"], _softmax, ("input", "p", "dim"), family="softmax", defaults={"dim": 1})


# ------------------------------------------------------------------------------ constants
def _unconstrained(ctx: RuleContext, call: BoundCall) -> None:
    """Constant-valued tensors are unchanged by any permutation, and reading a tensor's shape,
    dtype or device says nothing about the order of its entries: no constraint on their axes
    (constant outputs admit permutations only: ``ones`` is not moved by other maps)."""
    for tensor in call.call.tensors():
        ctx.unread(tensor)
    for tensor in call.call.output_tensors():
        ctx.free(tensor)


def _positional_factory(ctx: RuleContext, call: BoundCall) -> None:
    """Values that depend on position (arange, random draws) keep their axes fixed."""
    for out in call.call.output_tensors():
        ctx.fix(out)


add_ops(["zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty", "empty_strided", "scalar_tensor"],
        _unconstrained, family="constant_factory")
add_ops(["arange", "linspace", "logspace", "eye", "tensor", "as_tensor", "rand", "randn", "randint", "randperm", "rand_like",
         "randn_like", "randint_like", "bernoulli", "multinomial", "tril_indices", "triu_indices"],
        _positional_factory, family="positional_factory")


# ---------------------------------------------------------------------------- reshaping
def _reshape(ctx: RuleContext, call: BoundCall) -> None:
    tensors = call.tensors()
    for other in tensors[1:]:  # view_as / reshape_as read only the other tensor's shape
        ctx.unread(other)
    if tensors and call.out is not None:
        ctx.reshape(tensors[0], call.out)
        ctx.carries_linked()


add_ops(["view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "_unsafe_view",
         "_reshape_alias", "squeeze_", "unsqueeze_", "ravel", "atleast_1d", "atleast_2d", "atleast_3d", "squeeze_copy",
         "unsqueeze_copy", "view_copy"], _reshape, family="reshape", kinds={"invertible"})
add_ops(["expand", "expand_as", "broadcast_to", "expand_copy"], _unary, family="expand", kinds={"invertible"})


def _permuted(ctx: RuleContext, x: TensorRef, out: TensorRef, order: Sequence[int]) -> None:
    """Output axis ``d`` is input axis ``order[d]``."""
    for out_dim, in_dim in enumerate(order):
        ctx.same(x, in_dim, out, out_dim)
    ctx.carries_linked()


@define_rule("permute", aliases=[torch.permute, torch.Tensor.permute, "aten.permute_copy"], args=("input", "dims"), kinds={"invertible"})
def _permute(ctx: RuleContext, call: BoundCall) -> None:
    x, out = call.tensor("input"), call.out
    if x is None or out is None:
        return
    _permuted(ctx, x, out, call.dims("dims", x.ndim, spread=True) or [])


@define_rule("transpose", aliases=[torch.transpose, torch.Tensor.transpose, torch.swapaxes, torch.swapdims,
                                   torch.Tensor.swapaxes, "method:swapaxes", "aten.swapaxes", "aten.transpose_copy",
                                   "method:transpose_"], args=("input", "dim0", "dim1"), kinds={"invertible"})
def _transpose(ctx: RuleContext, call: BoundCall) -> None:
    x, out = call.tensor("input"), call.out
    if x is None or out is None:
        return
    order = list(range(x.ndim))
    if x.ndim >= 2:
        d0, d1 = call.dim("dim0", x.ndim, 0), call.dim("dim1", x.ndim, 1)
        order[d0], order[d1] = order[d1], order[d0]
    _permuted(ctx, x, out, order)


define_rule("t", aliases=[torch.t, torch.Tensor.t, "method:T", "aten.numpy_T", "method:mT", "aten.t_copy"], args=("input",),
            defaults={"dim0": -2, "dim1": -1}, kinds={"invertible"})(_transpose)


@define_rule("movedim", aliases=[torch.movedim, torch.moveaxis, torch.Tensor.movedim, "method:moveaxis"], args=("input", "source", "destination"),
             kinds={"invertible"})
def _movedim(ctx: RuleContext, call: BoundCall) -> None:
    x, out = call.tensor("input"), call.out
    if x is None or out is None:
        return
    source = call.dims("source", x.ndim) or []
    destination = call.dims("destination", x.ndim) or []
    order: list[int | None] = [None] * x.ndim
    for s, d in zip(source, destination):
        order[d] = s
    rest = iter(d for d in range(x.ndim) if d not in source)
    _permuted(ctx, x, out, [in_dim if in_dim is not None else next(rest) for in_dim in order])


# ------------------------------------------------------------------- concatenation/split
@define_rule("cat", aliases=[torch.cat, torch.concat, torch.concatenate, "aten.concat", "aten.concatenate"], args=("tensors", "dim"),
             kinds={"invertible"})
def _cat(ctx: RuleContext, call: BoundCall) -> None:
    out = call.out
    given = tensors_in(call.get("tensors", []))
    parts = [t for t in given if 0 not in t.shape]
    for empty in given:  # no entries to read: Phi-3's partial rotary passes an empty slice on
        if 0 in empty.shape:
            ctx.unread(empty)
    if out is None or not parts:
        return
    ctx.split(out, parts, int(call.get("dim", 0)))
    ctx.carries_linked()


@define_rule("stack", aliases=[torch.stack], args=("tensors", "dim"), kinds={"invertible"})
def _stack(ctx: RuleContext, call: BoundCall) -> None:
    out = call.out
    parts = tensors_in(call.get("tensors", []))
    if out is None or not parts:
        return
    dim = call.dim("dim", out.ndim)
    ctx.fix(out, dim)
    for part in parts:
        for d in range(part.ndim):
            ctx.same(part, d, out, d if d < dim else d + 1)
    ctx.carries_linked()


def _split(ctx: RuleContext, call: BoundCall) -> None:
    x = call.tensors()[0] if call.tensors() else None
    parts = [t for t in call.outputs if t is not None]
    if x is None or not parts:
        return
    dim = call.dim("dim", x.ndim)
    if sum(p.shape[dim] for p in parts) != x.shape[dim]:
        ctx.unknown([x, *parts])
        return
    ctx.split(x, [p for p in parts if p.shape[dim] > 0], dim)
    ctx.carries_linked()


add_ops(["split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk", "split_copy"], _split,
        ("input", "sizes", "dim"), family="split", kinds={"invertible"})


@define_rule("unbind", aliases=[torch.unbind, torch.Tensor.unbind], args=("input", "dim"), kinds={"invertible"})
def _unbind(ctx: RuleContext, call: BoundCall) -> None:
    """unbind and select: the chosen axis is fixed, the others pass through."""
    x = call.tensor("input")
    parts = [t for t in call.outputs if t is not None]
    if x is None:
        return
    dim = call.dim("dim", x.ndim)
    ctx.fix(x, dim)
    for part in parts:
        for d in range(part.ndim):
            ctx.same(x, d if d < dim else d + 1, part, d)
    ctx.carries_linked()


# --------------------------------------------------------------------------- indexing
@define_rule("getitem", aliases=[operator.getitem], args=("input", "index"), kinds={"invertible"})
def _getitem(ctx: RuleContext, call: BoundCall) -> None:
    source, index, out = call.get("input"), call.get("index"), call.out
    if out is None:  # an element that is no tensor (None, a size)
        for tensor in tensors_in(source):
            ctx.unread(tensor)
        return
    if isinstance(source, (list, tuple)):  # element of a tuple output
        if isinstance(index, int) and -len(source) <= index < len(source) and isinstance(source[index], TensorRef):
            for element in tensors_in(source):
                ctx.unread(element)  # the other elements are not read here
            ctx.same_all(source[index], out)
            ctx.carries_linked()
        else:
            ctx.unknown([*tensors_in(source), out])
        return
    if not isinstance(source, TensorRef):
        ctx.fix(out)
        return
    _tensor_index(ctx, source, index, out, carry=True)


@register_op_rule("setitem", aliases=[operator.setitem], args=("input", "index", "value"))
def _setitem(ctx: RuleContext, call: BoundCall) -> None:
    """``x[index] = value`` in place: ``value`` is coupled to ``x[index]`` as a read of that slice would be."""
    x, index, value = call.get("input"), call.get("index"), call.get("value")
    if not isinstance(x, TensorRef):
        ctx.unknown(call.tensors())
        return
    items = list(index) if isinstance(index, tuple) else [index]
    plain = all(i is Ellipsis or isinstance(i, (int, slice)) for i in items) and items.count(Ellipsis) <= 1
    kept = x.ndim - sum(1 for i in items if isinstance(i, int))
    if not plain or not isinstance(value, TensorRef) or value.ndim != kept:
        ctx.unknown(call.tensors())  # a broadcast or scalar write, or advanced indexing: kept fixed
        return
    _tensor_index(ctx, x, index, value)


def _tensor_index(ctx: RuleContext, x: TensorRef, index: object, out: TensorRef, carry: bool = False) -> None:
    """Basic indexing: full slices keep an axis, partial slices and integers fix it.

    With ``carry`` (a read, not ``setitem``), basic indexing carries the op's kinds on the
    axes it couples; indexing with a tensor does not.
    """
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (TensorRef, list)) for i in items):
        _advanced_index(ctx, x, [slice(None) if _is_full(i) else i for i in items], out)
        return
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + [slice(None)] * (x.ndim - explicit) + items[at + 1:]
    items += [slice(None)] * (x.ndim - sum(1 for i in items if i is not None))
    in_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
        elif isinstance(item, int):
            ctx.fix(x, in_dim)
            in_dim += 1
        elif isinstance(item, slice):
            block = _block(item, x.shape[in_dim])
            if block is not None and block[1] - block[0] == out.shape[out_dim]:
                ctx.slice(x, in_dim, *block, out, out_dim)
            else:
                ctx.fix(x, in_dim)
                ctx.fix(out, out_dim)
            in_dim += 1
            out_dim += 1
        else:
            ctx.unknown([x, out])
            return
    if carry:
        ctx.carries_linked()


def _block(item: slice, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a contiguous slice of an axis of ``size`` (None for strided or symbolic ones)."""
    if not all(isinstance(v, (int, type(None))) for v in (item.start, item.stop, item.step)) or item.step not in (None, 1):
        return None
    start, stop, _ = item.indices(size)
    return (start, max(start, stop)) if stop > start else None


def _is_full(item: object) -> bool:
    return isinstance(item, slice) and item.start in (None, 0) and item.stop is None and item.step in (None, 1)


@register_op_rule("index_tensor", aliases=["aten.index.Tensor", "aten.index", "aten._unsafe_index.Tensor", "aten._unsafe_index"],
                  args=("input", "indices"))
def _index_tensor(ctx: RuleContext, call: BoundCall) -> None:
    """``x[..., idx, ...]`` with one index tensor (ATen lists ``None`` for the axes left whole)."""
    x, indices, out = call.tensor("input"), call.get("indices"), call.out
    if x is None or out is None or not isinstance(indices, (list, tuple)):
        ctx.unknown([t for t in (x, out, *tensors_in(indices)) if t is not None])
        return
    _advanced_index(ctx, x, [slice(None) if i is None else i for i in indices], out)


def _advanced_index(ctx: RuleContext, x: TensorRef, items: list[object], out: TensorRef) -> None:
    """Indexing with one integer tensor ``idx`` at axis ``k``, every other axis taken whole.

    The output is ``x``'s axes before ``k``, then ``idx``'s axes, then ``x``'s axes after ``k``:
    those are coupled in order; axis ``k`` of ``x`` is fixed (which entries are read depends on
    their positions) unless ``idx`` holds ``topk`` positions of another axis whose every use is
    understood (expert numbers: :func:`~autoperm.infer.rules_moe.label_axis`), which axis ``k`` is
    then coupled with; ``idx``'s axes are coupled with the output axes they lay out. Anything
    else (several index tensors, boolean masks, slices with steps) keeps every axis fixed.
    """
    tensors = [i for i in items if isinstance(i, TensorRef)]
    rest_whole = all(isinstance(i, TensorRef) or _is_full(i) for i in items)
    if len(tensors) != 1 or not rest_whole or len(items) > x.ndim or tensors[0].floating:
        ctx.unknown([x, out, *tensors_in(items)])
        return
    idx = tensors[0]
    k = next(position for position, item in enumerate(items) if isinstance(item, TensorRef))
    if out.ndim != x.ndim - 1 + idx.ndim:
        ctx.unknown([x, out, idx])
        return
    labelled = label_axis(ctx, idx)
    if labelled is not None and ctx.size(labelled) == x.shape[k]:
        ctx.same_node(ctx.ax(x, k), labelled)
    else:
        ctx.fix(x, k)
    for d in range(k):
        ctx.same(x, d, out, d)
    for d in range(idx.ndim):
        ctx.same(idx, d, out, k + d)
    for d in range(k + 1, x.ndim):
        ctx.same(x, d, out, d - 1 + idx.ndim)


define_rule("select", aliases=[torch.select, torch.Tensor.select, "aten.select_copy"], args=("input", "dim", "index"),
            kinds={"invertible"})(_unbind)


def _sliced(ctx: RuleContext, x: TensorRef, out: TensorRef, dim: int, start: Any, end: Any, step: Any) -> None:
    """``out`` is ``x`` with entries ``start:end:step`` kept along ``dim``; an empty ``out`` reads nothing."""
    if 0 in out.shape and 0 not in x.shape:
        ctx.unread(x)
        ctx.free(out)
        return
    block = _block(slice(start, end, step), x.shape[dim]) if all(isinstance(v, (int, type(None))) for v in (start, end, step)) else None
    for d in range(x.ndim):
        if d != dim:
            ctx.same(x, d, out, d)
        elif block is not None and block[1] - block[0] == out.shape[d]:
            ctx.slice(x, d, *block, out, d)
        else:
            ctx.fix(x, d)
            ctx.fix(out, d)


@define_rule("slice", aliases=["aten.slice_copy"], args=("input", "dim", "start", "end", "step"), kinds={"invertible"})
def _slice(ctx: RuleContext, call: BoundCall) -> None:
    x, out = call.tensor("input"), call.out
    if x is not None and out is not None:
        _sliced(ctx, x, out, call.dim("dim", x.ndim), call.get("start"), call.get("end"), call.get("step", 1))
        ctx.carries_linked()


def _narrow(ctx: RuleContext, call: BoundCall) -> None:
    x, out = call.tensor("input"), call.out
    if x is None or out is None:
        return
    start, length = call.get("start"), call.get("length")
    end = start + length if isinstance(start, int) and isinstance(length, int) else length
    _sliced(ctx, x, out, call.dim("dim", x.ndim), start, end, 1)
    ctx.carries_linked()


add_ops(["narrow"], _narrow, ("input", "dim", "start", "length"), kinds={"invertible"})


# ---------------------------------------------------------------------------- reductions
def _reduction(ctx: RuleContext, call: BoundCall) -> None:
    x = call.tensors()[0] if call.tensors() else None
    if x is None or x.ndim == 0:
        return
    dims = call.dims("dim", x.ndim)
    for out in call.call.output_tensors():
        ctx.reduce(x, out, dims)


def _linear_reduction(ctx: RuleContext, call: BoundCall) -> None:
    """``sum`` and ``mean`` are linear: the axes they keep carry the op's kinds (the reduced
    ones admit permutations only: a sum is not moved by other maps)."""
    _reduction(ctx, call)
    x = call.tensors()[0] if call.tensors() else None
    if x is None or x.ndim == 0 or len(call.call.output_tensors()) != 1:
        return
    dims = call.dims("dim", x.ndim)
    reduced = set(range(x.ndim)) if dims is None else set(dims)
    for d in range(x.ndim):
        if d not in reduced:
            ctx.carries(x, d, role="out")
    out = call.out
    for d in range(out.ndim if out is not None else 0):
        ctx.carries(out, d)


def _position_reduction(ctx: RuleContext, call: BoundCall, positions: bool = False) -> None:
    """Reductions that can return positions (``positions``: they always do); ``max(a, b)`` of
    two tensors is elementwise."""
    tensors = call.tensors()
    if len(tensors) >= 2:
        ctx.elementwise(tensors, call.out)
        return
    x = tensors[0] if tensors else None
    if x is None or x.ndim == 0:
        return
    dims = call.dims("dim", x.ndim)
    outputs = call.call.output_tensors()
    for out in outputs:
        ctx.reduce(x, out, dims, keep_reduced_free=not (positions or len(outputs) > 1))


def _sorting(ctx: RuleContext, call: BoundCall) -> None:
    """sort, argsort: which entry lands where depends on the values; every axis stays fixed
    (``topk``, whose positions routers use as expert numbers, is in :mod:`autoperm.infer.rules_moe`)."""
    tensors = call.tensors()
    if tensors and tensors[0].ndim:
        for out in call.call.output_tensors():
            ctx.unknown([tensors[0], out])


for _name in ["sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "all", "any", "nansum", "nanmean",
              "count_nonzero", "var_mean", "std_mean", "aminmax"]:
    if _name in ("sum", "mean"):
        add_ops([_name], _linear_reduction, ("input", "dim"), family="reduction", kinds={"invertible"})
    else:
        add_ops([_name], _reduction, ("input", "dim"), family="reduction")
add_ops(["norm", "linalg_vector_norm"], _reduction, ("input", "p", "dim"), family="reduction")
add_ops(["argmax", "argmin"], functools.partial(_position_reduction, positions=True), ("input", "dim"), family="position_reduction")
add_ops(["max", "min", "median", "mode", "kthvalue"], _position_reduction, ("input", "dim"), family="position_reduction")
add_ops(["sort", "argsort"], _sorting, ("input", "dim"), family="position_reduction")
add_ops(["cummax", "cummin"], _position_reduction, ("input", "dim"), family="position_reduction")


# ------------------------------------------------------------------------ shape queries
add_ops(["size", "dim", "numel", "nelement", "ndimension", "sym_size", "sym_numel", "sym_stride", "stride", "is_contiguous",
         "get_device", "is_floating_point", "element_size", "_assert", "_assert_async", "_assert_scalar", "sym_constrain_range",
         "sym_constrain_range_for_size", "_check", "_check_is_size", "_assert_tensor_metadata"], _unconstrained, ("input",),
        family="shape_query")

_TENSOR_ATTRIBUTES = {"T": "t", "mT": "t"}


@define_rule("getattr", aliases=[getattr], args=("input", "name"), kinds={"invertible"})
def _getattr(ctx: RuleContext, call: BoundCall) -> None:
    """``x.shape`` / ``x.dtype`` / ``x.device`` constrain nothing; ``x.T`` is a transpose."""
    x, out = call.tensor("input"), call.out
    if out is None or x is None:
        ctx.unread(x)  # .shape, .dtype, .device: no tensor comes out
        return
    if call.get("name") in _TENSOR_ATTRIBUTES and x.ndim == 2:
        ctx.same(x, 0, out, 1)
        ctx.same(x, 1, out, 0)
        ctx.carries_linked()
    else:
        ctx.unknown([x, out])


# ---------------------------------------------------------------------------- scans
def _ordered_along(ctx: RuleContext, x: TensorRef | None, out: TensorRef | None, dims: list[int] | None) -> None:
    """An op that depends on the order along ``dims`` (None: unknown dims) and nothing else."""
    if x is None or out is None:
        return
    if dims is None:
        ctx.unknown([x, out])
        return
    for d in range(x.ndim):
        if d in dims or d >= out.ndim or x.shape[d] != out.shape[d]:
            ctx.fix(x, d)
            ctx.fix(out, d)
        else:
            ctx.same(x, d, out, d)


def _ndim(tensor: TensorRef | None) -> int:
    return tensor.ndim if tensor is not None else 0


def _ordered(ctx: RuleContext, call: BoundCall, name: str = "dims", spread: bool = False) -> None:
    """flip, roll, tril, cumulative sums, diff: the axes in argument ``name`` stay fixed, the others are coupled."""
    x = call.tensor("input")
    _ordered_along(ctx, x, call.out, call.dims(name, _ndim(x), spread=spread))
    for extra in ("prepend", "append"):  # diff concatenates these along dim
        tensor = call.tensor(extra)
        if tensor is not None and x is not None:
            _ordered_along(ctx, tensor, x, call.dims(name, tensor.ndim))


_scan = functools.partial(_ordered, name="dim")
add_ops(["cumsum", "cumprod", "logcumsumexp"], _scan, ("input", "dim"), family="scan")
add_ops(["diff"], _scan, ("input", "n", "dim", "prepend", "append"), family="scan", defaults={"dim": -1})
define_rule("flip", aliases=[torch.flip, torch.Tensor.flip], args=("input", "dims"))(functools.partial(_ordered, spread=True))



@register_op_rule("repeat", aliases=[torch.Tensor.repeat, "method:repeat", "aten.repeat"], args=("input", "repeats"))
def _repeat(ctx: RuleContext, call: BoundCall) -> None:
    """``x.repeat(*reps)`` (and ``x.tile(reps)``): each tiled axis is the concatenation of
    ``reps[d]`` copies of ``x``'s.

    Every copy carries the same permutation; new leading axes hold copies and are free.
    """
    x, out = call.tensor("input"), call.out
    reps = call.get("repeats")
    if reps is None:
        reps = list(call.varargs)
    elif not isinstance(reps, (list, tuple)):
        reps = [reps, *call.varargs]
    if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
        reps = list(reps[0])
    if x is not None and call.op == "tile" and len(reps) < x.ndim:  # tile pads its counts with leading 1s
        reps = [1] * (x.ndim - len(reps)) + list(reps)
    if (
        x is None or out is None or not all(isinstance(r, int) for r in reps) or len(reps) < x.ndim
        or list(out.shape) != [*reps[: len(reps) - x.ndim], *(s * r for s, r in zip(x.shape, reps[len(reps) - x.ndim:]))]
    ):
        ctx.unknown([t for t in (x, out) if t is not None])
        return
    lead = len(reps) - x.ndim
    for d in range(lead):
        ctx.free(out, d)
    for d in range(x.ndim):
        count = reps[lead + d]
        if count == 1:
            ctx.same(x, d, out, lead + d)
        elif x.shape[d] == 1:
            ctx.free(out, lead + d)
        else:
            ctx.define(out, lead + d, "concat", [ctx.ax(x, d)] * count)


@register_op_rule("unfold", aliases=[torch.Tensor.unfold, "method:unfold", "aten.unfold"], args=("input", "dimension", "size", "step"))
def _unfold(ctx: RuleContext, call: BoundCall) -> None:
    """``x.unfold(dim, size, step)``: sliding windows along ``dim`` (HaloNet's blocked attention).

    The windowed axis and the new window axis index positions and stay fixed; the other axes
    pass through.
    """
    x, out, dim = call.tensor("input"), call.out, call.get("dimension")
    if x is None or out is None or not isinstance(dim, int) or out.ndim != x.ndim + 1:
        ctx.unknown([t for t in (x, out) if t is not None])
        return
    dim %= x.ndim
    for d in range(x.ndim):
        if d == dim:
            ctx.fix(x, d)
            ctx.fix(out, d)
        else:
            ctx.same(x, d, out, d)
    ctx.fix(out, x.ndim)


register_op_rule("tile", aliases=[torch.tile, torch.Tensor.tile, "method:tile", "aten.tile"], args=("input", "repeats"))(_repeat)


@register_op_rule(
    "repeat_interleave",
    aliases=[torch.repeat_interleave, torch.Tensor.repeat_interleave, "method:repeat_interleave", "aten.repeat_interleave"],
    args=("input", "repeats", "dim", "output_size"),
)
def _repeat_interleave(ctx: RuleContext, call: BoundCall) -> None:
    """``x.repeat_interleave(r, dim)``: entry ``i`` of the axis becomes entries ``i * r ... i * r + r - 1``.

    The repeated axis is the product of ``x``'s axis (outer) and ``r`` identical copies (inner,
    free, as copies made by ``expand`` are: grouped-query attention repeats key/value heads so).
    Other axes pass through. Tensor-valued repeats (a different count per entry) keep it fixed.
    """
    x, out, repeats, dim = call.tensor("input"), call.out, call.get("repeats"), call.get("dim")
    if x is None or out is None or not isinstance(repeats, int) or not isinstance(dim, int) or out.ndim != x.ndim:
        ctx.unknown([t for t in (x, out) if t is not None])
        return
    dim %= x.ndim
    for d in range(x.ndim):
        if d != dim:
            ctx.same(x, d, out, d)
    if repeats == 1:
        ctx.same(x, dim, out, dim)
    elif x.shape[dim] == 1:
        ctx.free(out, dim)
    else:
        outer, _copies = ctx.product_node(out, dim, [x.shape[dim], repeats])
        ctx.same_node(outer, ctx.ax(x, dim))


define_rule("roll", aliases=[torch.roll, torch.Tensor.roll], args=("input", "shifts", "dims"))(_ordered)
define_rule("triangle", aliases=[torch.tril, torch.triu, torch.Tensor.tril, torch.Tensor.triu, "aten.tril", "aten.triu",
                                 "method:tril", "method:triu"], args=("input", "diagonal"), defaults={"dims": [-1, -2]})(_ordered)


# ----------------------------------------------------------------------------- modules
# Modules that compute one of the ops above on their first input (the rule's module form).
_MODULE_OPS = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Hardtanh: "hardtanh", nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.Softplus: "softplus", nn.Mish: "mish", nn.Softsign: "softsign",
    nn.Tanhshrink: "tanhshrink", nn.LogSigmoid: "logsigmoid", nn.Threshold: "threshold", nn.Hardshrink: "hardshrink",
    nn.Softshrink: "softshrink", nn.Dropout: "dropout", nn.Dropout1d: "dropout1d", nn.Dropout2d: "dropout2d",
    nn.Dropout3d: "dropout3d", nn.AlphaDropout: "alpha_dropout", nn.FeatureAlphaDropout: "feature_alpha_dropout",
    nn.Identity: "alias", nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.Softmin: "softmin",
    nn.Flatten: "flatten", nn.Unflatten: "unflatten",
}
for _module_type, _name in _MODULE_OPS.items():
    register_module_rule(_module_type, op_rule(_name))
