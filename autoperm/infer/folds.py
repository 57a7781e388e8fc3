"""Foldable gains: norms over the last axis whose output only linear layers read, and LayerScales.

A LayerNorm or RMSNorm computes ``gain * n(x) + bias``. When every reader of its output is a
linear layer over that axis, ``W (gain * n + bias) + b = (W diag(gain)) n + (b + W bias)``:
the gain and bias can move into the readers (:func:`autoperm.spec.canonicalize`), and the norm
then keeps the larger group its rule states for a norm without gain (``OpRule.folded_kinds``).

:func:`find_norm_folds` finds them in the traced graph: the ``layer_norm`` and ``rms_norm`` calls
(modules, functional and ATen forms) and Hugging Face's decomposed RMSNorm
``weight * (x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps))`` (casts allowed in between). A
reader is ``nn.Linear`` / ``F.linear`` (weight axis 1), ``x @ W`` and ``addmm(b, x, W)`` (axis 0),
or ``nn.MultiheadAttention`` with query, key and value all the norm's output (``in_proj_weight``
axis 1), reached directly or through reshapes that keep the last axis, casts, token selection
(``x[:, 0]``) and means over other axes. Both the gain and every reader's weight must be used by
no other call: a tied LM head (``F.linear(x, embed.weight)``) shares its table with the
embedding, and folding a gain into it would change the embedding too, so such a norm is not
foldable.

A LayerScale, ``gain * h`` with ``h`` the output of one linear layer that nothing else reads
(through identity and dropout modules and casts), folds into that layer's rows and bias
(:func:`_layer_scale`); the product is then the identity and keeps every kind.

For the kind record of the folded model (:attr:`RuleContext.fold_overrides`) each foldable norm
says, per call of its graph and axis: the normalised axes of input and output admit the rule's
``folded_kinds`` (fixing the all-ones vector where ``folded_fixes_ones``), the gain's and bias's
axes and the statistics' intermediate axes are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autoperm.infer.registry import OpRule, bind, op_rule
from autoperm.spec.kinds import ALL_KINDS
from autoperm.spec.schema import NormFold, Reader
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph

__all__ = ["FoldPlan", "Override", "find_norm_folds"]

logger = logging.getLogger(__name__)

Override = dict[Hashable, "tuple[frozenset[str], bool] | None"]
"""Axis node -> (kinds it admits once folded, whether they must fix ones), or ``None``: ignored."""

_CASTS = {"contiguous", "clone", "detach", "to", "_to_copy", "float", "double", "half", "bfloat16", "type", "type_as", "alias"}
_SHAPE_ONLY = {"size", "dim", "numel", "nelement", "ndimension", "sym_size", "sym_numel", "stride", "is_contiguous"}
_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda"}


@dataclass
class FoldPlan:
    """The foldable norms of a traced graph and the kind overrides their calls need.

    Attributes:
        folds: one record per foldable norm, in graph order.
        overrides: graph node -> :data:`Override` for the calls of the foldable norms.
        descriptions: graph node -> the norm it belongs to, for ``kind_limited_by`` of folded kinds.
    """

    folds: tuple[NormFold, ...] = ()
    overrides: dict[str, Override] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)


class _Graph:
    """Consumers, producers and uses of the tensors of a traced graph."""

    def __init__(self, traced: TracedGraph):
        self.traced = traced
        self.consumers: dict[str, list[OpCall]] = {}
        self.producer: dict[str, OpCall] = {}
        self.uses: dict[str, int] = {}
        self.outputs = {ref.id for ref in traced.outputs}
        self.bound: dict[str, tuple[Any, OpRule | None]] = {}
        for call in traced.calls:
            self.bound[call.node] = bind(call)
            used: set[str] = set()
            for ref in call.tensors():
                if call not in self.consumers.setdefault(ref.id, []):
                    self.consumers[ref.id].append(call)
                if ref.state_name is not None:
                    used.add(self.canonical(ref.state_name))
            for name in call.module_state:
                used.add(self.canonical(f"{call.module_name}.{name}" if call.module_name else name))
            for name in used:
                self.uses[name] = self.uses.get(name, 0) + 1
            for ref in call.output_tensors():
                self.producer[ref.id] = call

    def canonical(self, name: str) -> str:
        return self.traced.aliases.get(name, name)

    def module_state(self, call: OpCall, name: str) -> tuple[str, TensorRef] | None:
        """The state-dict name and tensor of a module call's own state tensor ``name``."""
        full = f"{call.module_name}.{name}" if call.module_name else name
        ref = self.traced.state.get(self.canonical(full))
        return (full, ref) if ref is not None else None

    def only_user(self, name: str) -> bool:
        """Whether one call alone uses state tensor ``name``."""
        return self.uses.get(self.canonical(name), 0) == 1

    def op(self, call: OpCall | None) -> str | None:
        if call is None:
            return None
        rule = self.bound[call.node][1]
        return rule.name if rule is not None else None


def find_norm_folds(traced: TracedGraph) -> FoldPlan:
    """The norms of ``traced`` whose gain can be folded into the linear layers reading them.

    Args:
        traced: the traced graph (after :func:`autoperm.infer.fused_splits.split_fused_axes`).

    Returns:
        A :class:`FoldPlan`; empty when the model has no foldable norm.
    """
    graph = _Graph(traced)
    plan = FoldPlan()
    folds: list[NormFold] = []
    for call in traced.calls:
        try:
            found = _norm_call(graph, call) or _decomposed_rms_norm(graph, call) or _layer_scale(graph, call)
        except Exception as error:  # an unexpected call signature: leave the norm unfolded (its kinds stay as inferred)
            logger.warning("could not check %s for a foldable norm (%s: %s); leaving it unfolded", call.describe(), type(error).__name__, error)
            continue
        if found is None:
            continue
        fold, override = found
        folds.append(fold)
        for node, axes in override.items():
            plan.overrides.setdefault(node, {}).update(axes)
            plan.descriptions[node] = f"{fold.op} at node {fold.node!r} with its gain folded"
    plan.folds = tuple(folds)
    return plan


def _norm_call(graph: _Graph, call: OpCall) -> tuple[NormFold, dict[str, Override]] | None:
    """A ``layer_norm`` / ``rms_norm`` call (module, functional or ATen) over the last axis with a foldable gain."""
    bound, rule = graph.bound[call.node]
    if rule is None or rule.folded_kinds is None:
        return None
    outputs = call.output_tensors()
    if not outputs or any(graph.consumers.get(extra.id) for extra in outputs[1:]):
        return None
    if call.module is not None:
        x = bound.input(0)
        shape = getattr(call.module, "normalized_shape", None)
        gain = graph.module_state(call, "weight")
        bias = graph.module_state(call, "bias") if getattr(call.module, "bias", None) is not None else None
    else:
        x = bound.tensor("input")
        shape = bound.get("normalized_shape")
        weight, bias_ref = bound.tensor("weight"), bound.tensor("bias")
        gain = (weight.state_name, weight) if weight is not None and weight.state_name else None
        if bias_ref is not None and bias_ref.state_name is None:
            return None  # a bias computed in the graph cannot move into the readers' biases
        bias = (bias_ref.state_name, bias_ref) if bias_ref is not None else None
    if x is None or gain is None or not x.ndim:
        return None
    features = x.shape[-1]
    if not isinstance(shape, (int, list, tuple)) or (not isinstance(shape, int) and len(shape) != 1):
        return None
    if gain[1].shape != (features,) or not graph.only_user(gain[0]):
        return None
    if bias is not None and (bias[1].shape != (features,) or not graph.only_user(bias[0])):
        return None
    readers = _readers(graph, outputs[0], features)
    if not readers:
        return None
    fold = NormFold(node=call.node, op=rule.name, gain=gain[0], bias=bias[0] if bias else None, readers=tuple(readers))
    stream = (rule.folded_kinds, rule.folded_fixes_ones)
    override: Override = {(x.id, x.ndim - 1): stream, (outputs[0].id, outputs[0].ndim - 1): stream, (gain[1].id, 0): None}
    if bias is not None:
        override[(bias[1].id, 0)] = None
    return fold, {call.node: override}


def _decomposed_rms_norm(graph: _Graph, call: OpCall) -> tuple[NormFold, dict[str, Override]] | None:
    """``weight * (x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps))`` with casts in between (Hugging Face's RMSNorm)."""
    found = _gain_product(graph, call)
    if found is None:
        return None
    gain, scaled, out = found
    features = gain.shape[0]
    normalised = scaled
    while graph.op(graph.producer.get(normalised.id)) in _CASTS:
        source = graph.producer[normalised.id].tensors()
        if not source or source[0].shape != normalised.shape:
            return None
        normalised = source[0]
    product = graph.producer.get(normalised.id)
    if graph.op(product) != "mul" or len(product.tensors()) != 2:
        return None
    first, second = product.tensors()
    x, rstd = (first, second) if second.shape[-1] == 1 else (second, first)
    if x.shape != normalised.shape or rstd.shape[-1] != 1:
        return None
    chain = _statistics_chain(graph, rstd, x)
    if chain is None or not graph.only_user(gain.state_name):
        return None
    readers = _readers(graph, out, features)
    if not readers:
        return None
    rule = op_rule("rms_norm")
    stream = (rule.folded_kinds, rule.folded_fixes_ones)
    last = lambda t: (t.id, t.ndim - 1)  # noqa: E731
    overrides: dict[str, Override] = {}
    for step in chain:
        overrides[step.node] = {last(t): None for t in [*step.tensors(), *step.output_tensors()] if t.id != x.id}
        overrides[step.node][last(x)] = stream
    overrides[product.node] = {last(x): stream, last(rstd): None, last(normalised): stream}
    overrides[call.node] = {(gain.id, 0): None, last(scaled): stream, last(out): stream}
    fold = NormFold(node=call.node, op="rms_norm", gain=gain.state_name, readers=tuple(readers))
    return fold, overrides


def _gain_product(graph: _Graph, call: OpCall) -> tuple[TensorRef, TensorRef, TensorRef] | None:
    """``(gain, scaled, out)`` when ``call`` is ``gain * scaled`` with ``gain`` a state vector over the
    last axis of an activation ``scaled`` of ``out``'s shape, else ``None``."""
    if graph.op(call) != "mul":
        return None
    tensors, outputs = call.tensors(), call.output_tensors()
    out = outputs[0] if len(outputs) == 1 else None
    if len(tensors) != 2 or out is None:
        return None
    gains = [t for t in tensors if t.state_name is not None and t.ndim == 1]
    if len(gains) != 1:
        return None
    gain = gains[0]
    scaled = tensors[1] if tensors[0] is gain else tensors[0]
    if scaled.state_name is not None or scaled.shape != out.shape or not scaled.ndim or scaled.shape[-1] != gain.shape[0]:
        return None
    return gain, scaled, out


def _layer_scale(graph: _Graph, call: OpCall) -> tuple[NormFold, dict[str, Override]] | None:
    """``gain * h`` where ``h`` is the output of one linear layer that nothing else reads (LayerScale),
    reached through identity and dropout modules and casts."""
    found = _gain_product(graph, call)
    if found is None or not graph.only_user(found[0].state_name):
        return None
    gain, scaled, out = found
    features = gain.shape[0]
    written = scaled
    while True:  # back from the product to the layer that writes its input, through calls that pass it on
        producer = graph.producer.get(written.id)
        if producer is None or written.id in graph.outputs or len(graph.consumers.get(written.id, [])) != 1:
            return None
        writer = _writer(graph, producer, written, features)
        if writer is not None:
            break
        inputs = producer.tensors()
        passes = (isinstance(producer.module, _PASS_THROUGH_MODULES) or graph.op(producer) in _CASTS)
        if not passes or len(inputs) != 1 or inputs[0].shape != written.shape:
            return None
        written = inputs[0]
    last = lambda t: (t.id, t.ndim - 1)  # noqa: E731
    override: Override = {(gain.id, 0): None, last(scaled): (ALL_KINDS, False), last(out): (ALL_KINDS, False)}
    return NormFold(node=call.node, op="layer_scale", gain=gain.state_name, writers=(writer,)), {call.node: override}


def _writer(graph: _Graph, call: OpCall, output: TensorRef, features: int) -> Reader | None:
    """The linear layer ``call`` (``nn.Linear`` or ``F.linear`` with state weight and bias used by no
    other call) that writes ``output``'s last axis of ``features`` entries, as a :class:`Reader` of its rows."""
    bound, rule = graph.bound[call.node]
    if [t.id for t in call.output_tensors()] != [output.id]:
        return None
    if isinstance(call.module, nn.Linear):
        weight = graph.module_state(call, "weight")
        bias = graph.module_state(call, "bias") if call.module.bias is not None else None
        names = [weight[0] if weight else None, bias[0] if bias else None]
        shape = weight[1].shape if weight else None
    elif call.module is None and rule is not None and rule.name == "linear":
        weight_ref, bias_ref = bound.tensor("weight"), bound.tensor("bias")
        if weight_ref is None or weight_ref.state_name is None or (bias_ref is not None and bias_ref.state_name is None):
            return None
        names = [weight_ref.state_name, bias_ref.state_name if bias_ref is not None else None]
        shape = weight_ref.shape
    else:
        return None
    if names[0] is None or shape is None or len(shape) != 2 or shape[0] != features:
        return None
    if not all(graph.only_user(name) for name in names if name is not None):
        return None
    return Reader(weight=names[0], axis=0, bias=names[1])


def _statistics_chain(graph: _Graph, rstd: TensorRef, x: TensorRef) -> list[OpCall] | None:
    """The calls ``pow(x, 2) -> mean(-1, keepdim) -> + eps -> rsqrt`` that end in ``rstd``, or ``None``."""
    rsqrt = graph.producer.get(rstd.id)
    if graph.op(rsqrt) != "rsqrt" or len(rsqrt.tensors()) != 1:
        return None
    shifted = graph.producer.get(rsqrt.tensors()[0].id)
    if graph.op(shifted) != "add" or len(shifted.tensors()) != 1:
        return None
    mean = graph.producer.get(shifted.tensors()[0].id)
    if graph.op(mean) != "mean" or len(mean.tensors()) != 1:
        return None
    squared_ref = mean.tensors()[0]
    bound = graph.bound[mean.node][0]
    if bound.dims("dim", squared_ref.ndim) != [squared_ref.ndim - 1] or not bound.get("keepdim", False):
        return None
    square = graph.producer.get(squared_ref.id)
    if graph.op(square) != "pow" or [t.id for t in square.tensors()] != [x.id]:
        return None
    exponent = graph.bound[square.node][0].get("exponent", graph.bound[square.node][0].get("other"))
    if exponent != 2:
        return None
    return [square, mean, shifted, rsqrt]


def _readers(graph: _Graph, tensor: TensorRef, features: int) -> list[Reader] | None:
    """The linear layers that alone read ``tensor``'s last axis (of ``features`` entries), or ``None``
    when some other call reads it (or it is a model output)."""
    if tensor.id in graph.outputs or not tensor.ndim or tensor.shape[-1] != features:
        return None
    found: list[Reader] = []
    for call in graph.consumers.get(tensor.id, []):
        reader = _reader(graph, call, tensor, features)
        if isinstance(reader, Reader):
            found.append(reader)
            continue
        if reader == "shape":
            continue
        if reader != "through":
            return None
        outputs = call.output_tensors()
        further = _readers(graph, outputs[0], features) if len(outputs) == 1 else None
        if further is None:
            return None
        found.extend(further)
    return found


def _reader(graph: _Graph, call: OpCall, tensor: TensorRef, features: int) -> Reader | str | None:
    """How ``call`` reads ``tensor``: a :class:`Reader`, ``"through"`` (passes the axis on unchanged
    and linearly), ``"shape"`` (reads its shape alone), or ``None`` (anything else)."""
    bound, rule = graph.bound[call.node]
    op = rule.name if rule is not None else None
    others = [t for t in call.tensors() if t.id != tensor.id]
    if call.module is not None:
        if isinstance(call.module, nn.Linear) and bound.input(0) is not None and bound.input(0).id == tensor.id and not others:
            return _checked_reader(graph, graph.module_state(call, "weight"), 1, graph.module_state(call, "bias") if call.module.bias is not None else None, features)
        if isinstance(call.module, nn.MultiheadAttention):
            return _attention_reader(graph, call, tensor, features)
        outputs = call.output_tensors()
        if (isinstance(call.module, _PASS_THROUGH_MODULES) and not others and len(outputs) == 1
                and outputs[0].shape == tensor.shape):
            return "through"  # timm's ``fc_norm = Identity()``, ``head_drop = Dropout()`` before the head
        return None
    if op == "linear" and bound.tensor("input") is not None and bound.tensor("input").id == tensor.id:
        return _state_reader(graph, bound.tensor("weight"), 1, bound.args.get("bias"), features)
    if op == "matmul" and len(call.tensors()) == 2 and call.tensors()[0].id == tensor.id:
        return _state_reader(graph, call.tensors()[1], 0, None, features)
    if op == "addmm" and bound.tensor("mat1") is not None and bound.tensor("mat1").id == tensor.id and tensor.ndim == 2:
        if bound.args.get("beta", 1) != 1 or bound.args.get("alpha", 1) != 1:
            return None
        return _state_reader(graph, bound.tensor("mat2"), 0, bound.args.get("input"), features)
    if op in _SHAPE_ONLY or (op == "getattr" and bound.get("name") in _SHAPE_ATTRIBUTES):
        return "shape"
    outputs = call.output_tensors()
    if others or len(outputs) != 1 or not outputs[0].ndim or outputs[0].shape[-1] != features:
        return None
    if op in _CASTS and outputs[0].shape == tensor.shape:
        return "through"
    if rule is not None and rule.family == "reshape":
        return "through"  # a row-major reshape that keeps the last axis's size keeps the axis
    if op == "getitem" and _keeps_last_axis(bound.get("index"), tensor.ndim):
        return "through"
    if op in ("select", "slice"):  # torch.export's form of ``x[:, 0]`` and ``x[:, 1:]``
        dims = bound.dims("dim", tensor.ndim)
        return "through" if dims is not None and tensor.ndim - 1 not in dims else None
    if op == "mean":
        dims = bound.dims("dim", tensor.ndim)
        return "through" if dims is not None and tensor.ndim - 1 not in dims else None
    return None


_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout)
"""Modules that pass every entry through on its own: the identity, and elementwise dropout (the
identity in evaluation; in training a random elementwise mask, which commutes with a gain)."""


def _keeps_last_axis(index: Any, ndim: int) -> bool:
    """Whether indexing with ``index`` (ints, slices, ``None``) leaves the last of ``ndim`` axes whole."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (item is None or isinstance(item, (int, slice))) for item in items):
        return False
    indexed = [item for item in items if item is not None]
    if len(indexed) < ndim:
        return True
    return len(indexed) == ndim and indexed[-1] == slice(None)  # ``x[:, 0, :]``: the last axis taken whole


def _state_reader(graph: _Graph, weight: Any, axis: int, bias: Any, features: int) -> Reader | None:
    if not isinstance(weight, TensorRef) or weight.state_name is None:
        return None
    if bias is not None and (not isinstance(bias, TensorRef) or bias.state_name is None):
        return None
    return _checked_reader(graph, (weight.state_name, weight), axis, (bias.state_name, bias) if bias is not None else None, features)


def _checked_reader(graph: _Graph, weight: tuple[str, TensorRef] | None, axis: int, bias: tuple[str, TensorRef] | None,
                    features: int) -> Reader | None:
    """A reader when its 2-D weight runs over ``features`` along ``axis`` and neither it nor its bias is shared."""
    if weight is None or weight[1].ndim != 2 or weight[1].shape[axis] != features or not graph.only_user(weight[0]):
        return None
    if bias is not None and (bias[1].shape != (weight[1].shape[1 - axis],) or not graph.only_user(bias[0])):
        return None
    return Reader(weight=weight[0], axis=axis, bias=bias[0] if bias is not None else None)


def _attention_reader(graph: _Graph, call: OpCall, tensor: TensorRef, features: int) -> Reader | None:
    """``nn.MultiheadAttention`` whose query, key and value are all ``tensor`` (self-attention, packed projection)."""
    module: nn.MultiheadAttention = call.module
    positional = list(call.args) + [call.kwargs.get(name) for name in ("query", "key", "value")[len(call.args):]]
    qkv = positional[:3]
    if len(qkv) < 3 or any(not isinstance(t, TensorRef) or t.id != tensor.id for t in qkv):
        return None
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn or module.in_proj_weight is None:
        return None
    bias = graph.module_state(call, "in_proj_bias") if module.in_proj_bias is not None else None
    return _checked_reader(graph, graph.module_state(call, "in_proj_weight"), 1, bias, features)
