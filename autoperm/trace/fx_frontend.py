"""torch.fx front-end: symbolic tracing plus shape propagation on meta tensors.

Modules that have a module rule (and the stock ``torch.nn`` layers) are kept as leaves; the
rest of the model is traced through. Shapes come from running the graph on ``meta`` tensors
(no real arithmetic, no copy of the weights), falling back to a real forward pass if an op has
no meta kernel.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from autoperm.errors import InputMismatchError, TraceError
from autoperm.trace.common import bind_inputs, convert_arguments, first_lines, refs_for_value, state_aliases
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph, invariant_axes, tensors_in

__all__ = ["trace_fx", "symbolic_trace", "LeafTracer"]

logger = logging.getLogger(__name__)

LeafPredicate = Callable[[nn.Module], bool]
EditHook = Callable[[str, Any], Any]


class LeafTracer(fx.Tracer):
    """An fx tracer that keeps every module ``is_leaf`` accepts (plus stock torch.nn layers) whole."""

    def __init__(self, is_leaf: LeafPredicate):
        super().__init__()
        self._is_leaf = is_leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return self._is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], is_leaf: LeafPredicate
) -> tuple[fx.GraphModule, list[Any]]:
    """Trace ``model`` symbolically; returns the GraphModule and the placeholder values in order.

    Forward arguments the caller did not give are specialised to their defaults (``concrete_args``).

    Raises:
        TraceError: symbolic tracing failed (data-dependent control flow, unsupported Python).
    """
    try:
        bound = bind_inputs(model.forward, args, kwargs)
    except TypeError as error:
        raise TraceError(f"the example inputs do not fit {type(model).__name__}.forward: {error}") from error
    bound.apply_defaults()
    given = set(bound.signature.bind(*args, **kwargs).arguments)
    concrete = {name: value for name, value in bound.arguments.items() if name not in given}
    tracer = LeafTracer(is_leaf)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        raise TraceError(f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {first_lines(error)}") from error
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    placeholder_values = [bound.arguments[name] for name in bound.arguments if name in given]
    return gm, placeholder_values


class _NodeError(RuntimeError):
    """A node of the traced graph failed while running on the example inputs."""

    def __init__(self, node: fx.Node, error: BaseException):
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        super().__init__(f"at node {node.name!r} ({node.op} {target}): {type(error).__name__}: {first_lines(error, 1)}")


_SHAPE_PRESERVING = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.modules.dropout._DropoutNd,
)


class _ValueRecorder(fx.Interpreter):
    """Runs a GraphModule and keeps every node's output (tensors, tuples, Python values).

    With ``shapes_only`` (meta tensors), stock layers that keep their input's shape are not run
    at all: meta BatchNorm alone costs half a millisecond a call.
    """

    def __init__(self, gm: fx.GraphModule, keep: set[str] | None = None, shapes_only: bool = False,
                 edit: EditHook | None = None):
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self._keep = keep
        self._shapes_only = shapes_only
        self._edit = edit

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._shapes_only and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            module = self.fetch_attr(target)
            if isinstance(module, _SHAPE_PRESERVING) and type(module).__module__.startswith("torch.nn."):
                return torch.empty_like(args[0])
            if type(module) in (nn.LSTM, nn.GRU, nn.RNN):  # on meta tensors their decomposition takes seconds
                return _recurrent_shapes(module, args[0])
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._shapes_only and target in (torch.cat, torch.concat) and not kwargs.keys() - {"dim"}:
            tensors = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(tensors, (list, tuple)) and tensors and all(isinstance(t, torch.Tensor) and t.ndim == tensors[0].ndim for t in tensors):
                shape = list(tensors[0].shape)
                dim = dim % len(shape)
                shape[dim] = sum(t.shape[dim] for t in tensors)
                dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
                return torch.empty(shape, dtype=dtype, device="meta")
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as error:
            raise _NodeError(n, error) from error
        if self._keep is None or n.name in self._keep:
            self.values[n.name] = result
            if self._edit is not None:
                result = self._edit(n.name, result)
        return result


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


class _Runner(nn.Module):
    """Holds a GraphModule so that functional_call can swap its state for meta tensors."""

    def __init__(self, gm: fx.GraphModule, keep: set[str] | None = None, shapes_only: bool = False,
                 edit: EditHook | None = None):
        super().__init__()
        self.gm = gm
        self.keep = keep
        self.shapes_only = shapes_only
        self.edit = edit
        self.recorder: _ValueRecorder | None = None

    def forward(self, *inputs: Any) -> Any:
        self.recorder = _ValueRecorder(self.gm, self.keep, self.shapes_only, self.edit)
        return self.recorder.run(*inputs)


def run_graph(
    gm: fx.GraphModule,
    inputs: list[Any],
    state: dict[str, torch.Tensor] | None = None,
    keep: set[str] | None = None,
    shapes_only: bool = False,
    edit: EditHook | None = None,
) -> dict[str, Any]:
    """Run ``gm`` on ``inputs`` (optionally with ``state`` swapped in); returns node values.

    ``edit(name, value)``, when given, is called on the output of every node in ``keep`` and
    its return value replaces that output for the rest of the forward pass (the returned
    node values are the outputs before the edit).
    """
    runner = _Runner(gm, keep, shapes_only, edit)
    if state is None:
        runner(*inputs)
    else:
        torch.func.functional_call(runner, {f"gm.{k}": v for k, v in state.items()}, tuple(inputs), strict=False)
    assert runner.recorder is not None
    return runner.recorder.values


def _propagate(gm: fx.GraphModule, inputs: list[Any]) -> dict[str, Any]:
    def to_meta(value: Any) -> Any:
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    meta_state = {
        name: torch.empty_like(t, device="meta")
        for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    }
    try:
        with torch.no_grad():
            return run_graph(gm, tree_map(to_meta, inputs), meta_state, shapes_only=True)
    except Exception as error:
        logger.debug("shape propagation on meta tensors failed (%s); running a real forward pass", error)
    try:
        with torch.no_grad():
            return run_graph(gm, inputs)
    except _NodeError as error:
        raise InputMismatchError(
            f"the example inputs do not fit the model: {error}. Check the input shapes and dtypes "
            "(--input-shape / --dtype, or example_inputs)."
        ) from error


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    """The real value of a ``get_attr`` target (``None`` if it cannot be read)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], is_leaf: LeafPredicate) -> TracedGraph:
    """Trace ``model`` with torch.fx into a :class:`TracedGraph` (see :func:`symbolic_trace`)."""
    gm, placeholder_values = symbolic_trace(model, args, kwargs, is_leaf)
    values = _propagate(gm, placeholder_values)
    aliases, _ = state_aliases(model)
    converted: dict[str, Any] = {}
    calls: list[OpCall] = []
    inputs: list[TensorRef] = []
    outputs: list[TensorRef] = []
    state: dict[str, TensorRef] = {}
    constants: list[TensorRef] = []

    def state_ref(name: str, tensor: Any) -> TensorRef:
        canonical = aliases.get(name, name)
        if canonical not in state:
            state[canonical] = TensorRef(f"state:{canonical}", tuple(tensor.shape), state_name=canonical,
                                         floating=tensor.is_floating_point())
        return state[canonical]


    for node in gm.graph.nodes:
        value = values.get(node.name)
        if node.op == "placeholder":
            refs = refs_for_value(node.name, value)
            inputs.extend(r for r in refs if r is not None)
            converted[node.name] = _structure(value, refs)
        elif node.op == "get_attr":
            if node.target in aliases:
                converted[node.name] = state_ref(node.target, value)
            elif isinstance(value, torch.Tensor):
                ref = TensorRef(node.name, tuple(value.shape), constant=True, floating=value.is_floating_point(),
                                invariant_axes=invariant_axes(_attribute(gm, node.target)))
                constants.append(ref)
                converted[node.name] = ref
            else:
                converted[node.name] = value
        elif node.op in ("call_function", "call_method", "call_module"):
            refs = refs_for_value(node.name, value)
            converted[node.name] = _structure(value, refs)
            call_args = convert_arguments(node.args, converted)
            call_kwargs = convert_arguments(dict(node.kwargs), converted)
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                local_state = module.state_dict(keep_vars=True)
                for pname, tensor in local_state.items():
                    state_ref(f"{node.target}.{pname}", tensor)
                calls.append(OpCall(node.name, type(module), type(module).__name__, call_args, call_kwargs, refs,
                                    module=module, module_name=str(node.target), module_state=tuple(local_state)))
            elif node.op == "call_method":
                calls.append(OpCall(node.name, f"method:{node.target}", f"Tensor.{node.target}", call_args, call_kwargs, refs))
            else:
                calls.append(OpCall(node.name, node.target, _describe_target(node.target), call_args, call_kwargs, refs))
        elif node.op == "output":
            outputs.extend(tensors_in(convert_arguments(node.args, converted)))
    return TracedGraph(calls, inputs, outputs, state, aliases, "fx", constants)


def _structure(value: Any, refs: list[TensorRef | None]) -> Any:
    """The converted form of a node value: a ref, a list of refs (tuples), or the plain value."""
    if isinstance(value, torch.Tensor):
        return refs[0]
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) or not isinstance(v, (list, tuple, dict)) for v in value):
        return [refs[i] if isinstance(v, torch.Tensor) else v for i, v in enumerate(value)]
    if isinstance(value, (tuple, list, dict)):
        return refs
    if isinstance(value, torch.Size):
        return tuple(value)
    return value


def _describe_target(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module in ("torch", "torch._C._VariableFunctions") or "VariableFunctions" in module:
        return f"torch.{name}"
    if module == "_operator":
        return f"operator.{name}"
    return f"{module}.{name}" if module else name
