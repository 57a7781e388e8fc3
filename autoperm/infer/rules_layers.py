"""Rules for layers: linear / matmul, convolutions, norms, embeddings, pooling, padding, recurrent layers.

Each op has one rule object for its functional forms (``F.linear``, ``aten.conv2d``) and its
``nn`` modules; the module form reads the op's arguments from the module's state tensors and
attributes.

Symmetry kinds: linear layers, matrix products, ungrouped convolutions (channel axes) and
embeddings preserve invertible maps on their feature axes (weights and biases that write the
output take role ``"out"``, weights contracted against the input role ``"in"``); a product of
two activations preserves orthogonal maps on its contraction; RMSNorm without a gain preserves
orthogonal maps on the axes it normalises; every other layer (LayerNorm, BatchNorm, GroupNorm,
pooling, recurrent layers) preserves permutations only. Once a gain that only linear layers read
is folded into them (:mod:`autoperm.infer.folds`), RMSNorm preserves orthogonal maps and LayerNorm
the orthogonal maps that fix the all-ones vector (``folded_kinds``, ``folded_fixes_ones``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autoperm.infer.context import AffineLayout, RuleContext
from autoperm.infer.registry import BoundCall, ModuleArguments, define_rule, library_aliases, register_op_rule
from autoperm.infer.rules_core import same_shape
from autoperm.trace.graph import TensorRef, tensors_in


def _from_module(*state: str, **attributes: str) -> ModuleArguments:
    """Module arguments: the module's first input as ``input``, its state tensors named in
    ``state``, and each argument of ``attributes`` from the module attribute it names."""

    def arguments(ctx: RuleContext, call: BoundCall) -> dict[str, Any]:
        found = {"input": call.input(0), **{name: ctx.state(name) for name in state}}
        found.update({argument: getattr(call.module, attribute) for argument, attribute in attributes.items()})
        return found

    return arguments


first_input = _from_module()


def _state_name(value: Any) -> str | None:
    return getattr(value, "state_name", None)


def _affine(channel_axis: int, weight_axis: int = 0, norm: bool = False, vector: bool = False) -> Callable[[BoundCall], AffineLayout | None]:
    """An :attr:`OpRule.affine` fact: the output's channels (``channel_axis``) are scaled by the
    state tensor ``weight`` along ``weight_axis`` and shifted by ``bias``; with ``vector`` only a
    1-D weight counts (a LayerNorm over several trailing dims has none per channel)."""

    def layout(call: BoundCall) -> AffineLayout | None:
        weight = call.get("weight")
        if _state_name(weight) is None or (vector and weight.ndim != 1):
            return None
        return AffineLayout(channel_axis, _state_name(weight), weight_axis, _state_name(call.get("bias")), norm)

    return layout


_CONV_AFFINE, _CONV_TRANSPOSED_AFFINE = _affine(1), _affine(1, weight_axis=1)


def _conv_affine(call: BoundCall) -> AffineLayout | None:
    """A convolution's output channels; a transposed one's weight is ``(in, out / groups, ...)``."""
    if not call.get("transposed", False):
        return _CONV_AFFINE(call)
    return _CONV_TRANSPOSED_AFFINE(call) if call.get("groups", 1) == 1 else None


def _addmm_affine(call: BoundCall) -> AffineLayout | None:
    """``input + mat1 @ mat2`` with ``mat2`` an ``(in, out)`` weight and ``input`` its bias (Hugging Face's Conv1D)."""
    weight, bias = _state_name(call.get("mat2")), call.get("input")
    if weight is None or _state_name(call.get("mat1")) or (bias is not None and _state_name(bias) is None):
        return None
    return AffineLayout(-1, weight, 1, _state_name(bias))


# ------------------------------------------------------------------------------ linear
@define_rule("linear", aliases=[F.linear], args=("input", "weight", "bias"), module_types=[nn.Linear],
             module_arguments=_from_module("weight", "bias"), affine=_affine(-1), kinds={"invertible"})
def _linear(ctx: RuleContext, call: BoundCall) -> None:
    """``out[..., o] = sum_i x[..., i] weight[o, i] + bias[o]``."""
    x, weight, bias, out = call.tensor("input"), call.tensor("weight"), call.tensor("bias"), call.out
    if x is None or weight is None or out is None:
        ctx.unknown([t for t in (x, weight, bias, out) if t is not None])
        return
    for d in range(x.ndim - 1):
        ctx.same(x, d, out, d)
    contraction = _contraction_kinds(x, weight)
    if weight.ndim == 2:
        _contract(ctx, x, -1, weight, 1)
        ctx.same(weight, 0, out, -1)
        ctx.producer(weight, 0)
        ctx.carries(weight, 0, role="out")
        ctx.carries(out, -1)
    else:  # a vector weight: out has no feature axis
        _contract(ctx, x, -1, weight, 0)
    ctx.carries(x, -1, kinds=contraction)
    ctx.carries(weight, -1, role="in", kinds=contraction)
    if bias is not None and out.ndim:
        ctx.elementwise([bias], out, carry=True)


def _contraction_kinds(a: TensorRef, b: TensorRef) -> tuple[str, ...] | None:
    """What a contraction of ``a`` against ``b`` preserves: every kind when one of them is a state
    tensor (which takes role ``"in"``: ``W T^-1`` against ``T x``) or when both are activations
    coupled as dual (``M`` on one, ``M^-T`` on the other: see :func:`matmul`); orthogonal maps when
    both are state (both would move by ``T``, and ``T^T T = I`` only for orthogonal ``T``)."""
    both_state = a.state_name is not None and b.state_name is not None
    return ("orthogonal",) if both_state else None


def _contract(ctx: RuleContext, a: TensorRef, dim_a: int, b: TensorRef, dim_b: int) -> None:
    """Couple the contracted axes of ``a`` and ``b``: as dual when both are activations (the
    product keeps ``M`` on one against ``M^-T`` on the other), as alike otherwise (a state
    tensor's role ``"in"`` already says that it moves by the inverse transpose)."""
    ctx.same(a, dim_a, b, dim_b, dual=a.state_name is None and b.state_name is None)


def matmul(ctx: RuleContext, a: TensorRef | None, b: TensorRef | None, out: TensorRef | None) -> None:
    """``torch.matmul`` semantics, including vectors and broadcast batch dims."""
    if a is None or b is None or out is None:
        ctx.unknown([t for t in (a, b, out) if t is not None])
        return
    contraction = _contraction_kinds(a, b)
    a_role, b_role = ("in" if a.state_name is not None else None), ("in" if b.state_name is not None else None)
    if a.ndim == 1 and b.ndim == 1:
        _contract(ctx, a, 0, b, 0)
        ctx.carries(a, 0, role=a_role, kinds=contraction)
        ctx.carries(b, 0, role=b_role, kinds=contraction)
        return
    if b.ndim == 1:
        _contract(ctx, a, -1, b, 0)
        ctx.carries(a, -1, role=a_role, kinds=contraction)
        ctx.carries(b, 0, role=b_role, kinds=contraction)
        for d in range(a.ndim - 1):
            ctx.same(a, d, out, d)
            ctx.carries(a, d, role="out")
            ctx.carries(out, d)
        return
    if a.ndim == 1:
        _contract(ctx, a, 0, b, -2)
        ctx.carries(a, 0, role=a_role, kinds=contraction)
        ctx.carries(b, -2, role=b_role, kinds=contraction)
        for d in range(b.ndim - 2):
            ctx.same(b, d, out, d)
        ctx.same(b, -1, out, -1)
        ctx.carries(b, -1, role="out")
        ctx.carries(out, -1)
        ctx.producer(b, -1)
        return
    _contract(ctx, a, -1, b, -2)
    ctx.same(a, -2, out, -2)
    ctx.same(b, -1, out, -1)
    ctx.producer(b, -1)
    ctx.carries(a, -1, role=a_role, kinds=contraction)
    ctx.carries(b, -2, role=b_role, kinds=contraction)
    ctx.carries(a, -2, role="out")
    ctx.carries(out, -2)
    ctx.carries(b, -1, role="out")
    ctx.carries(out, -1)
    for tensor in (a, b):  # broadcast batch dims, right-aligned
        offset = out.ndim - tensor.ndim
        for d in range(tensor.ndim - 2):
            if tensor.shape[d] == out.shape[d + offset]:
                ctx.same(tensor, d, out, d + offset)


@define_rule("matmul", aliases=[torch.matmul, torch.Tensor.matmul, torch.mm, torch.bmm, torch.Tensor.mm, torch.Tensor.bmm,
                                "aten.mm", "aten.bmm", "method:mm", "method:bmm", "method:__matmul__", operator.matmul, "aten.__matmul__"],
             args=("input", "other"), kinds={"invertible"})
def _matmul(ctx: RuleContext, call: BoundCall) -> None:
    tensors = call.tensors()
    if len(tensors) == 2:
        matmul(ctx, tensors[0], tensors[1], call.out)
    else:
        ctx.unknown([*tensors, *call.call.output_tensors()])


@define_rule("addmm", aliases=[torch.addmm, torch.baddbmm, torch.addmv, "aten.baddbmm", "aten.addmv", "method:addmm", "method:baddbmm"],
             args=("input", "mat1", "mat2"), affine=_addmm_affine, kinds={"invertible"})
def _addmm(ctx: RuleContext, call: BoundCall) -> None:
    """``beta * input + alpha * mat1 @ mat2`` (also the batched and matrix-vector forms)."""
    mat1 = call.tensor("mat1") or call.tensor("batch1") or call.tensor("mat")
    mat2 = call.tensor("mat2") or call.tensor("batch2") or call.tensor("vec")
    matmul(ctx, mat1, mat2, call.out)
    ctx.elementwise([call.tensor("input")], call.out, carry=True)


@register_op_rule("einsum", aliases=[torch.einsum], args=("equation", "operands"))
def _einsum(ctx: RuleContext, call: BoundCall) -> None:
    """Every index letter is one axis: all axes carrying the same letter are coupled."""
    equation = str(call.get("equation", "")).replace(" ", "")
    given = call.get("operands", call.get("tensors"))  # torch.einsum(eq, *operands); aten.einsum(eq, tensors)
    operands = [t for t in (given if isinstance(given, (list, tuple)) else [given, *call.varargs]) if isinstance(t, TensorRef)]
    out = call.out
    if "->" not in equation or "." in equation or out is None:
        ctx.unknown([*operands, *call.call.output_tensors()])
        return
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != len(operands):
        ctx.unknown([*operands, out])
        return
    first: dict[str, tuple[TensorRef, int]] = {}
    for tensor, term in zip([*operands, out], [*terms, output]):
        for dim, letter in enumerate(term):
            if tensor.shape[dim] == 1:
                continue
            if letter in first:
                ctx.same(first[letter][0], first[letter][1], tensor, dim)
            else:
                first[letter] = (tensor, dim)


# ------------------------------------------------------------------------- convolutions
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_MODULE = _from_module("weight", "bias", groups="groups", transposed="transposed")


@define_rule("conv", aliases=[F.conv1d, F.conv2d, F.conv3d, "aten.conv1d", "aten.conv2d", "aten.conv3d"], args=_CONV_ARGS,
             module_types=[nn.Conv1d, nn.Conv2d, nn.Conv3d], module_arguments=_CONV_MODULE, affine=_conv_affine, kinds={"invertible"})
def _conv(ctx: RuleContext, call: BoundCall) -> None:
    """N-d convolution. Channels couple through the weight; spatial axes are fixed.

    Grouped convolutions split the channel axes into ``groups x per-group`` factors: whole
    groups move together on input and output, and the within-group channels of the input
    share one permutation with the weight's input axis. A depthwise conv ties its input and
    output channels.
    """
    x, weight, bias, out = call.tensor("input"), call.tensor("weight"), call.tensor("bias"), call.out
    groups, transposed = int(call.get("groups", 1)), bool(call.get("transposed", False))
    if x is None or weight is None or out is None:
        ctx.unknown([t for t in (x, weight, bias, out) if t is not None])
        return
    spatial = weight.ndim - 2
    channel = x.ndim - spatial - 1
    if channel < 0:
        ctx.unknown([x, weight, out])
        return
    for d in range(channel):
        ctx.same(x, d, out, d)
    for d in range(spatial):
        ctx.fix(x, channel + 1 + d)
        ctx.fix(out, channel + 1 + d)
        ctx.fix(weight, 2 + d)
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    ctx.producer(weight, out_axis)
    if groups == 1:
        ctx.same(x, channel, weight, in_axis)
        ctx.same(weight, out_axis, out, channel)
        ctx.carries(x, channel)
        ctx.carries(weight, in_axis, role="in")
        ctx.carries(weight, out_axis, role="out")
        ctx.carries(out, channel)
        if bias is not None:
            ctx.carries(bias, 0, role="out")
    else:
        group_atom = ctx.atom(groups)
        x_channels, out_channels = x.shape[channel], out.shape[channel]
        in_per_group = x_channels // groups
        out_per_group = out_channels // groups
        ctx.define(x, channel, "product", [group_atom, ctx.ax(weight, 1) if not transposed else ctx.atom(in_per_group)])
        out_inner = ctx.ax(weight, 1) if transposed else ctx.atom(out_per_group)
        ctx.define(out, channel, "product", [group_atom, out_inner])
        if transposed:
            ctx.define(weight, 0, "product", [group_atom, ctx.atom(in_per_group)])
            ctx.fix(weight, 0)  # transposed grouped convs: keep the input side fixed (rare)
        else:
            ctx.same(weight, 0, out, channel)
    if bias is not None:
        ctx.same(bias, 0, out, channel)


define_rule("conv_transpose", aliases=[F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, "aten.conv_transpose1d",
                                       "aten.conv_transpose2d", "aten.conv_transpose3d"], args=_CONV_T_ARGS,
            defaults={"transposed": True}, module_types=[nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d],
            module_arguments=_CONV_MODULE, affine=_conv_affine, kinds={"invertible"})(_conv)
define_rule("convolution", aliases=["aten._convolution"],
            args=("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"),
            affine=_conv_affine, kinds={"invertible"})(_conv)


# ---------------------------------------------------------------------------- norms
_NORM_STATE = ("weight", "bias", "running_mean", "running_var")


@define_rule("batch_norm", aliases=[F.batch_norm, "aten._native_batch_norm_legit_no_training", "aten._native_batch_norm_legit",
                                         "aten.native_batch_norm", "aten._batch_norm_impl_index", "aten.cudnn_batch_norm",
                                         "aten._native_batch_norm_legit_functional", "aten.batch_norm_with_update",
                                         "aten._batch_norm_no_update", "aten._batch_norm_with_update"],
             args=("input", "running_mean", "running_var", "weight", "bias"),
             module_types=[nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm],
             module_arguments=_from_module(*_NORM_STATE), meta_output=same_shape, affine=_affine(1, norm=True))
def _batch_norm(ctx: RuleContext, call: BoundCall) -> None:
    """BatchNorm / InstanceNorm: per-channel statistics and affine vectors on axis 1."""
    x, outputs, vectors = call.tensor("input"), call.call.output_tensors(), [call.tensor(n) for n in _NORM_STATE]
    if x is None or not outputs:
        ctx.unknown([t for t in (x, *outputs[:1], *vectors) if t is not None])
        return
    ctx.same_all(x, outputs[0])
    channel = 1 if x.ndim > 1 else 0
    for vector in vectors:
        if vector is not None and vector.ndim == 1:
            ctx.same(vector, 0, x, channel)
    for extra in outputs[1:]:  # saved statistics of the ATen kernels
        if extra.ndim == 1 and extra.shape[0] == x.shape[channel]:
            ctx.same(extra, 0, x, channel)


define_rule("instance_norm", aliases=[F.instance_norm], args=("input", "running_mean", "running_var", "weight", "bias"),
            module_types=[nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d],
            module_arguments=_from_module(*_NORM_STATE), meta_output=same_shape, affine=_affine(1, norm=True))(_batch_norm)


def trailing_norm(ctx: RuleContext, x: TensorRef | None, out: list[TensorRef], vectors: list[TensorRef | None]) -> None:
    """LayerNorm / RMSNorm over trailing dims: statistics ignore order, vectors align right."""
    if x is None or not out:
        ctx.unknown([t for t in (x, *out, *vectors) if t is not None])
        return
    ctx.same_all(x, out[0])
    for extra in out[1:]:  # mean / rstd outputs of native_layer_norm
        ctx.elementwise([extra], x)
    ctx.elementwise(vectors, x)


@define_rule("layer_norm", aliases=[F.layer_norm, "aten.native_layer_norm"], args=("input", "normalized_shape", "weight", "bias"),
             module_types=[nn.LayerNorm], module_arguments=_from_module("weight", "bias"), meta_output=same_shape,
             affine=_affine(-1, norm=True, vector=True), folded_kinds={"orthogonal"}, folded_fixes_ones=True)
def _layer_norm(ctx: RuleContext, call: BoundCall) -> None:
    trailing_norm(ctx, call.tensor("input"), call.call.output_tensors(), [call.tensor("weight"), call.tensor("bias")])


@define_rule("rms_norm", aliases=[*library_aliases("rms_norm"), "aten._fused_rms_norm"], args=("input", "normalized_shape", "weight", "eps"),
             module_types=[nn.RMSNorm], module_arguments=_from_module("weight", normalized_shape="normalized_shape"),
             affine=_affine(-1, norm=True, vector=True), kinds={"orthogonal"}, folded_kinds={"orthogonal"})
def _rms_norm(ctx: RuleContext, call: BoundCall) -> None:
    """``x / rms(x) * weight`` over the trailing ``normalized_shape`` dims. Without a gain an
    orthogonal map of the normalised axes keeps ``rms(x)`` and passes through; a gain is an
    elementwise product (permutations only)."""
    x, outputs, weight = call.tensor("input"), call.call.output_tensors(), call.tensor("weight")
    trailing_norm(ctx, x, outputs, [weight])
    shape = call.get("normalized_shape")
    count = 1 if isinstance(shape, int) else len(shape) if isinstance(shape, (list, tuple)) else 0
    if x is None or not outputs or call.get("weight") is not None or not 0 < count <= x.ndim:
        return
    for d in range(x.ndim - count, x.ndim):
        ctx.carries(x, d)
        ctx.carries(outputs[0], d)


def group_norm(ctx: RuleContext, x: TensorRef | None, out: TensorRef | None, groups: int, vectors: list[TensorRef | None]) -> None:
    """GroupNorm: channels = groups x per-group. Whole groups and, inside them, channels can move."""
    if x is None or out is None:
        ctx.unknown([t for t in (x, out, *vectors) if t is not None])
        return
    ctx.same_all(x, out)
    channels = x.shape[1]
    if groups < 1 or channels % groups:
        ctx.fix(x, 1)
        return
    ctx.define(x, 1, "product", [ctx.atom(groups), ctx.atom(channels // groups)])
    for vector in vectors:
        if vector is not None:
            ctx.same(vector, 0, x, 1)


@define_rule("group_norm", aliases=[F.group_norm], args=("input", "num_groups", "weight", "bias"), module_types=[nn.GroupNorm],
             module_arguments=_from_module("weight", "bias", num_groups="num_groups"), meta_output=same_shape,
             affine=_affine(1, norm=True))
def _group_norm(ctx: RuleContext, call: BoundCall) -> None:
    outputs = call.call.output_tensors()
    x = call.tensor("input")
    groups = int(call.get("num_groups", 1))
    group_norm(ctx, x, outputs[0] if outputs else None, groups, [call.tensor("weight"), call.tensor("bias")])


@register_op_rule("native_group_norm", args=("input", "weight", "bias", "N", "C", "HxW", "group", "eps"))
def _native_group_norm(ctx: RuleContext, call: BoundCall) -> None:
    outputs = call.call.output_tensors()
    group_norm(ctx, call.tensor("input"), outputs[0] if outputs else None, int(call.get("group", 1)),
               [call.tensor("weight"), call.tensor("bias")])
    for extra in outputs[1:]:  # (N, group) statistics
        ctx.fix(extra)


# --------------------------------------------------------------------------- embeddings
@define_rule("embedding", aliases=[F.embedding], args=("input", "weight", "padding_idx", "max_norm"), module_types=[nn.Embedding],
             module_arguments=_from_module("weight", max_norm="max_norm"), kinds={"invertible"})
def _embedding(ctx: RuleContext, call: BoundCall) -> None:
    """Rows are addressed by token id (fixed); the embedding dim couples with the output.

    A lookup is linear in the table (role ``"out"``); with ``max_norm`` the rows it reads are
    renormalised, which only orthogonal maps keep.
    """
    indices, weight, out = call.tensor("indices") or call.tensor("input"), call.tensor("weight"), call.out
    if indices is None or weight is None or out is None:
        ctx.unknown([t for t in (indices, weight, out) if t is not None])
        return
    ctx.fix(weight, 0)
    ctx.same(weight, 1, out, -1)
    ctx.producer(weight, 1)
    renormalised = ("orthogonal",) if call.get("max_norm") is not None else None
    ctx.carries(weight, 1, role="out", kinds=renormalised)
    ctx.carries(out, -1, kinds=renormalised)
    for d in range(indices.ndim):
        ctx.same(indices, d, out, d)


# ----------------------------------------------------------------------------- pooling
def spatial_op(ctx: RuleContext, x: TensorRef | None, outputs: list[TensorRef], spatial: int) -> None:
    """Pooling / resizing: batch and channel axes couple, spatial axes stay fixed."""
    if x is None:
        ctx.unknown(outputs)
        return
    leading = x.ndim - spatial
    for out in outputs:
        for d in range(leading):
            if d < out.ndim:
                ctx.same(x, d, out, d)
        for d in range(leading, out.ndim):
            ctx.fix(out, d)
    for d in range(leading, x.ndim):
        ctx.fix(x, d)


def _pool(ctx: RuleContext, call: BoundCall, spatial: int) -> None:
    tensors = call.tensors()
    spatial_op(ctx, tensors[0] if tensors else None, call.call.output_tensors(), spatial)


_POOL_MODULES = {
    1: [nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d],
    2: [nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d],
    3: [nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d],
}
for _dims, _modules in _POOL_MODULES.items():
    _names = [f"max_pool{_dims}d", f"avg_pool{_dims}d", f"adaptive_avg_pool{_dims}d", f"adaptive_max_pool{_dims}d",
              f"lp_pool{_dims}d", f"max_pool{_dims}d_with_indices", f"fractional_max_pool{_dims}d"]
    _aliases = [getattr(F, n) for n in _names if hasattr(F, n)] + [getattr(torch, n) for n in _names if hasattr(torch, n)]
    _aliases += [f"aten.{n}" for n in _names] + [f"aten._adaptive_avg_pool{_dims}d"]
    _aliases += [f"aten.upsample_{mode}{_dims}d" for mode in ("nearest", "linear", "bilinear", "bicubic", "trilinear", "_nearest_exact")]
    _aliases += [f"aten._upsample_{mode}{_dims}d" for mode in ("nearest_exact", "bilinear2d_aa")]
    define_rule(f"pool{_dims}d", aliases=_aliases, args=("input",), family="pool", module_types=_modules)(
        functools.partial(_pool, spatial=_dims))


@define_rule("interpolate", aliases=[F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest], args=("input",),
             module_types=[nn.Upsample], module_arguments=first_input)
def _interpolate(ctx: RuleContext, call: BoundCall) -> None:
    x = call.tensor("input")
    spatial_op(ctx, x, call.call.output_tensors(), max((x.ndim - 2) if x is not None else 0, 1))


@define_rule("pad", aliases=[F.pad, "aten.constant_pad_nd", "aten.reflection_pad1d", "aten.reflection_pad2d",
                                  "aten.replication_pad2d", "aten.replication_pad1d", "aten.reflection_pad3d",
                                  "aten.replication_pad3d", "aten._pad_circular"], args=("input", "pad"),
             module_types=[nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                           nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                           nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d],
             module_arguments=_from_module(pad="padding"))
def _pad(ctx: RuleContext, call: BoundCall) -> None:
    """Padding fixes the axes it pads and leaves the others coupled."""
    x, out, amounts = call.tensor("input"), call.out, call.get("pad") or call.get("padding") or []
    if x is None or out is None:
        return
    padded = {x.ndim - 1 - i // 2 for i, amount in enumerate(amounts) if amount}
    for d in range(x.ndim):
        if d in padded or x.shape[d] != out.shape[d]:
            ctx.fix(x, d)
            ctx.fix(out, d)
        else:
            ctx.same(x, d, out, d)


def patches(ctx: RuleContext, image: TensorRef | None, columns: TensorRef | None) -> None:
    """``F.unfold`` / ``F.fold``: columns ``(B, C * k, L)`` against an image ``(B, C, *spatial)``.

    Channel ``c`` of the image is rows ``c * k .. c * k + k - 1`` of the columns (one per kernel
    position), so the column axis is the product of the channel axis and a fixed kernel-position
    factor; the spatial and block axes stay fixed.
    """
    if image is None or columns is None or columns.ndim not in (2, 3) or image.ndim != columns.ndim + 1:
        ctx.unknown([t for t in (image, columns) if t is not None])
        return
    channel = image.ndim - 3
    per_channel, rest = divmod(columns.shape[channel], image.shape[channel])
    if rest:
        ctx.unknown([image, columns])
        return
    if channel:
        ctx.same(image, 0, columns, 0)
    kernel = ctx.atom(per_channel)
    ctx.fix_node(kernel)
    ctx.define(columns, channel, "product", [ctx.ax(image, channel), kernel])
    ctx.fix(columns, channel + 1)
    for d in range(channel + 1, image.ndim):
        ctx.fix(image, d)


@define_rule("unfold_patches", aliases=[F.unfold, "aten.im2col"], args=("input", "kernel_size"), module_types=[nn.Unfold],
             module_arguments=first_input)
def _unfold_patches(ctx: RuleContext, call: BoundCall) -> None:
    patches(ctx, call.tensor("input"), call.out)


@define_rule("fold_patches", aliases=[F.fold, "aten.col2im"], args=("input", "output_size", "kernel_size"), module_types=[nn.Fold],
             module_arguments=first_input)
def _fold_patches(ctx: RuleContext, call: BoundCall) -> None:
    patches(ctx, call.out, call.tensor("input"))


@define_rule("prelu", aliases=[F.prelu, torch.prelu, "aten._prelu_kernel"], args=("input", "weight"), activation=True,
             module_types=[nn.PReLU], module_arguments=_from_module("weight"), meta_output=same_shape)
def _prelu(ctx: RuleContext, call: BoundCall) -> None:
    x, weight, out = call.tensor("input"), call.tensor("weight"), call.out
    if x is None or out is None:
        return
    ctx.same_all(x, out)
    if weight is not None and weight.ndim == 1 and weight.shape[0] > 1:
        ctx.same(weight, 0, x, 1 if x.ndim > 1 else 0)


@register_op_rule("glu", aliases=[F.glu], args=("input", "dim"))
def _glu(ctx: RuleContext, call: BoundCall) -> None:
    """``a * sigmoid(b)`` of the two halves: both halves share the output's permutation."""
    x, out = call.tensor("input"), call.out
    if x is None or out is None:
        return
    dim = call.dim("dim", x.ndim, -1)
    for d in range(x.ndim):
        if d != dim:
            ctx.same(x, d, out, d)
    ctx.define(x, dim, "concat", [ctx.ax(out, dim), ctx.ax(out, dim)])


# ------------------------------------------------------------------------- recurrent layers
def _recurrent_shapes(module: nn.RNNBase, x: torch.Tensor) -> Any:
    """Empty outputs of the right shapes for ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on input ``x``."""
    directions = 2 if module.bidirectional else 1
    hidden = module.proj_size or module.hidden_size
    out = torch.empty((*x.shape[:-1], directions * hidden), dtype=x.dtype, device=x.device)
    batch = () if x.ndim == 2 else (x.shape[0] if module.batch_first else x.shape[1],)
    h_n = torch.empty((directions * module.num_layers, *batch, hidden), dtype=x.dtype, device=x.device)
    if isinstance(module, nn.LSTM):
        c_n = torch.empty((directions * module.num_layers, *batch, module.hidden_size), dtype=x.dtype, device=x.device)
        return out, (h_n, c_n)
    return out, h_n


@define_rule("recurrent", module_types=[nn.RNN, nn.GRU, nn.LSTM], meta_output=_recurrent_shapes)
def _recurrent(ctx: RuleContext, call: BoundCall) -> None:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: the hidden units of each layer and direction are permutable.

    A unit's gates are rows ``g * H + i`` of ``weight_ih``, ``weight_hh`` and the biases (one
    block per gate), its recurrent input is column ``i`` of ``weight_hh``, and the output holds
    the last layer's units, one block per direction. The final states ``h_n`` / ``c_n`` (and
    initial states passed in) stack every layer and direction along their first axis with the
    unit on the last, so all of them share one permutation. A projection (``proj_size``) is
    not followed.
    """
    module, x, outputs = call.module, call.input(0), call.call.output_tensors()
    if x is None or not outputs or getattr(module, "proj_size", 0):
        return
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    directions = 2 if module.bidirectional else 1
    units: list[list[Any]] = []
    for layer in range(module.num_layers):
        units.append([])
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = ctx.state(f"weight_ih{suffix}"), ctx.state(f"weight_hh{suffix}")
            if w_ih is None or w_hh is None:
                return
            hidden = ctx.ax(w_hh, 1)
            units[layer].append(hidden)
            for tensor in (w_ih, w_hh, ctx.state(f"bias_ih{suffix}"), ctx.state(f"bias_hh{suffix}")):
                if tensor is not None:
                    ctx.define(tensor, 0, "concat", [hidden] * gates)
            if layer == 0:
                ctx.same(w_ih, 1, x, x.ndim - 1)
            elif directions == 1:
                ctx.same_node(ctx.ax(w_ih, 1), units[layer - 1][0])
            else:
                ctx.define(w_ih, 1, "concat", units[layer - 1])
    out = outputs[0]
    for dim in range(x.ndim - 1):
        ctx.same(x, dim, out, dim)
    if directions == 1:
        ctx.same_node(ctx.ax(out, out.ndim - 1), units[-1][0])
    else:
        ctx.define(out, out.ndim - 1, "concat", units[-1])
    for state in outputs[1:] + tensors_in([list(call.call.args[1:]), dict(call.call.kwargs)]):
        for hidden in (h for layer in units for h in layer):
            ctx.same_node(ctx.ax(state, state.ndim - 1), hidden)
