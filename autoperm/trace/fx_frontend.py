"""torch.fx front-end: symbolic tracing plus shape propagation on meta tensors.

Modules the caller's leaf predicate accepts (and the stock ``torch.nn`` layers) are kept as
leaves; the rest of the model is traced through. Shapes come from evaluating the graph on
``meta`` tensors with one evaluator (:class:`MetaEvaluator`, no real arithmetic, no copy of the
weights), falling back to a real forward pass if an op has no meta kernel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from autoperm.errors import InputMismatchError, TraceError
from autoperm.trace.common import bind_inputs, convert_arguments, first_lines, refs_for_value, state_aliases
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph, invariant_axes, tensors_in

__all__ = ["trace_fx", "symbolic_trace", "LeafTracer", "MetaEvaluator", "LeafPredicate", "MetaOutput", "no_extra_leaves"]

logger = logging.getLogger(__name__)

LeafPredicate = Callable[[nn.Module], bool]
# meta_output(module, x): a leaf module's meta output on meta input x known without running it, else None
MetaOutput = Callable[[nn.Module, torch.Tensor], Any]
EditHook = Callable[[str, Any], Any]


def no_extra_leaves(module: nn.Module) -> bool:
    """The default leaf predicate: only the stock ``torch.nn`` layers are kept whole."""
    return False


class LeafTracer(fx.Tracer):
    """An fx tracer that keeps every module ``is_leaf`` accepts (plus stock torch.nn layers) whole."""

    def __init__(self, is_leaf: LeafPredicate):
        super().__init__()
        self._is_leaf = is_leaf
        self._state_names: tuple[dict[int, str], dict[int, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return self._is_leaf(m) or super().is_leaf_module(m, module_qualified_name)

    # fx finds the name of a parameter or buffer by scanning the whole model on every access and
    # every tensor argument: quadratic in the model's size (seconds for GhostNetV3). A table does it once.
    def _state_name(self, tensor: torch.Tensor) -> str | None:
        if self._state_names is None:
            self._state_names = ({}, {})
            for name, value in self.root.named_parameters():
                self._state_names[0].setdefault(id(value), name)
            for name, value in self.root.named_buffers():
                self._state_names[1].setdefault(id(value), name)
        if isinstance(tensor, nn.Parameter):
            return self._state_names[0].get(id(tensor))
        return self._state_names[1].get(id(tensor))

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, torch.Tensor) and (self.proxy_buffer_attributes or isinstance(attr_val, nn.Parameter)):
            name = self._state_name(attr_val)
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            name = self._state_name(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


_UNKNOWN = object()


class _ShapeProxy(fx.Proxy):
    """A proxy that knows its value's shape and dtype, so shape arithmetic and branches run in Python.

    ``x.shape``, ``x.size()``, ``x.ndim``, ``x.dim()``, ``x.numel()`` and ``x.dtype`` answer with
    the values of the example inputs (the graph is specialised to those shapes, as an exported
    program is); anything whose value is unknown stays symbolic.
    """

    tracer: ShapeTracer

    def _value(self) -> Any:
        return self.tracer.values.get(self.node, _UNKNOWN)

    def _tensor(self) -> torch.Tensor | None:
        value = self._value()
        return value if isinstance(value, torch.Tensor) else None

    @property
    def shape(self) -> Any:  # type: ignore[override]
        value = self._tensor()
        return value.shape if value is not None else fx.Proxy.__getattr__(self, "shape")

    @property
    def ndim(self) -> Any:  # type: ignore[override]
        value = self._tensor()
        return value.ndim if value is not None else fx.Proxy.__getattr__(self, "ndim")

    @property
    def dtype(self) -> Any:  # type: ignore[override]
        value = self._tensor()
        return value.dtype if value is not None else fx.Proxy.__getattr__(self, "dtype")

    def size(self, *args: Any, **kwargs: Any) -> Any:
        value = self._tensor()
        return value.size(*args, **kwargs) if value is not None else fx.Proxy.__getattr__(self, "size")(*args, **kwargs)

    def dim(self) -> Any:
        value = self._tensor()
        return value.dim() if value is not None else fx.Proxy.__getattr__(self, "dim")()

    def numel(self) -> Any:
        value = self._tensor()
        return value.numel() if value is not None else fx.Proxy.__getattr__(self, "numel")()

    def __len__(self) -> int:
        value = self._value()
        if isinstance(value, torch.Tensor) and value.ndim:
            return len(value)
        if isinstance(value, (tuple, list)):
            return len(value)
        return super().__len__()

    def __iter__(self) -> Any:
        value = self._value()
        if isinstance(value, (tuple, list)):
            return iter([self[i] for i in range(len(value))])
        return super().__iter__()

    def __setitem__(self, key: Any, value: Any) -> None:
        """``x[key] = value`` (MViTv2 writes relative-position terms into a slice of its attention map)."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __bool__(self) -> bool:
        value = self._value()
        if isinstance(value, (bool, int, float)):
            return bool(value)
        return super().__bool__()


class ShapeTracer(LeafTracer):
    """A :class:`LeafTracer` whose proxies carry meta values (see :class:`_ShapeProxy`).

    Used when plain symbolic tracing fails on branches that test shapes (``if H % window``,
    ``max(k_h / q_h, 1.0)``, ``if x.ndim != 4``): those become Python values, and the model traces
    with torch.fx instead of the much slower torch.export.
    """

    def __init__(self, is_leaf: LeafPredicate, inputs: dict[str, Any], meta_output: MetaOutput | None = None):
        super().__init__(is_leaf)
        self.values: dict[fx.Node, Any] = {}
        self._inputs = {name: tree_map(_meta_like, value) for name, value in inputs.items()}
        self._meta_output = meta_output
        self._evaluator: MetaEvaluator | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None = None,
                     type_expr: Any | None = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        try:
            self.values[proxy.node] = self._evaluate(kind, target, args, kwargs)
        except Exception:  # an op without a meta kernel: its value stays unknown (and symbolic)
            self.values[proxy.node] = _UNKNOWN
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kind == "placeholder":
            return self._inputs.get(str(target).lstrip("*"), _UNKNOWN)
        if self._evaluator is None:
            self._evaluator = MetaEvaluator(self.root, self._meta_output)
        if kind == "get_attr":
            return self._evaluator.attribute(target)
        known = True

        def value_of(item: Any) -> Any:
            nonlocal known
            if isinstance(item, fx.Proxy):
                value = self.values.get(item.node, _UNKNOWN)
                known = known and value is not _UNKNOWN
                return value
            return item

        args = fx.node.map_aggregate(args, value_of)
        kwargs = fx.node.map_aggregate(kwargs, value_of)
        if not known or kind not in ("call_function", "call_method", "call_module"):
            return _UNKNOWN
        return self._evaluator.call(kind, target, args, kwargs)


class MetaEvaluator:
    """Evaluates graph operations on ``meta`` tensors: the one meta-shape evaluator of the fx front-end.

    :class:`ShapeTracer` calls it for each operation while tracing (so shape branches run in
    Python), and :func:`_propagate` for each node of the finished graph, which writes the
    values into ``node.meta["val"]`` (where torch.export's graphs carry theirs).

    Kept instead of torch's ``ShapeProp`` / ``FakeTensorProp``, which fall short here:
    ``ShapeProp`` runs real arithmetic (the weights must exist; seconds for large models), and
    ``FakeTensorProp`` runs every layer under fake-tensor dispatch. Measured on torchvision's
    resnet50 / densenet121 (one CPU thread, shared machine): this evaluator 0.03 s / 0.05 s, the
    same without the shortcuts below 0.09 s / 0.21 s, ``FakeTensorProp`` 0.42 s / 1.01 s. The
    shortcuts: stock layers whose output shape is known are not run (``meta_output``; meta
    BatchNorm costs half a millisecond a call, the meta decomposition of ``nn.LSTM`` seconds)
    and ``torch.cat`` is answered from its operands' shapes. Tensors a model makes in forward
    on the CPU (``torch.arange`` position tables) are moved onto ``meta`` where they meet the
    weights (:func:`_onto_meta_if_mixed`).
    """

    def __init__(self, root: nn.Module, meta_output: MetaOutput | None = None):
        self.root = root
        self.meta_output = meta_output
        self._module_state: dict[str, dict[str, torch.Tensor]] = {}

    def attribute(self, target: str) -> Any:
        """The meta value of a ``get_attr`` target."""
        with _unpatched_modules():
            return _meta_like(_attribute(self.root, target))

    def call(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The meta value of a ``call_function``, ``call_method`` or ``call_module`` node."""
        if kind == "call_function":
            concatenated = _meta_cat(target, args, kwargs)
            if concatenated is not None:
                return concatenated
        args, kwargs = _onto_meta_if_mixed(args, kwargs)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        module = self.root.get_submodule(target)
        if self.meta_output is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            shaped = self.meta_output(module, args[0])
            if shaped is not None:
                return shaped
        if target not in self._module_state:
            self._module_state[target] = {name: _meta_like(t) for name, t in module.state_dict(keep_vars=True).items()}
        with _unpatched_modules():  # tracing patches Module.__call__; this call must not be traced
            return torch.func.functional_call(module, self._module_state[target], tuple(args), kwargs, strict=False)


def _meta_cat(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``torch.cat`` of meta tensors from their shapes alone (None where that does not apply)."""
    if target not in (torch.cat, torch.concat) or kwargs.keys() - {"dim"}:
        return None
    tensors = args[0] if args else None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or not all(
        isinstance(t, torch.Tensor) and t.is_meta and t.ndim == tensors[0].ndim for t in tensors
    ):
        return None
    shape = list(tensors[0].shape)
    dim = dim % len(shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.empty(shape, dtype=dtype, device="meta")


_MODULE_CALL = nn.Module.__call__
_MODULE_GETATTR = nn.Module.__getattr__


@contextlib.contextmanager
def _unpatched_modules() -> Iterator[None]:
    """Restore ``nn.Module.__call__`` / ``__getattr__`` while torch.fx has them patched.

    Setting them when they are not patched is skipped: each assignment to a class attribute of
    ``nn.Module`` invalidates the attribute caches of every module class (a third of a millisecond).
    """
    patched = nn.Module.__call__, nn.Module.__getattr__
    if patched == (_MODULE_CALL, _MODULE_GETATTR):
        yield
        return
    nn.Module.__call__, nn.Module.__getattr__ = _MODULE_CALL, _MODULE_GETATTR  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]


def _meta_like(value: Any) -> Any:
    return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) and not value.is_meta else value


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Undo what a traced forward pass stored on the modules (caches such as ``self.rel_indices = ...``).

    Such a cache would otherwise hold a proxy, and the model would return proxies from then on.
    """
    saved = [(module, dict(module.__dict__), dict(module._buffers)) for module in model.modules()]
    try:
        yield
    finally:
        for module, attributes, buffers in saved:
            for name in [n for n in module.__dict__ if n not in attributes]:
                del module.__dict__[name]
            for name, value in attributes.items():
                if module.__dict__.get(name) is not value:
                    module.__dict__[name] = value
            if module._buffers.keys() != buffers.keys() or any(module._buffers[k] is not v for k, v in buffers.items()):
                module._buffers.clear()
                module._buffers.update(buffers)


def symbolic_trace(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], is_leaf: LeafPredicate,
    meta_output: MetaOutput | None = None,
) -> tuple[fx.GraphModule, list[Any]]:
    """Trace ``model`` symbolically; returns the GraphModule and the placeholder values in order.

    Forward arguments the caller did not give are specialised to their defaults (``concrete_args``).
    If plain symbolic tracing fails, tracing is tried again with shapes known
    (:class:`ShapeTracer`), which passes branches on shapes.

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
    def trace(tracer: LeafTracer) -> fx.GraphModule:
        with _attributes_kept(model):  # the graph module copies the constants tracing put on the model
            graph = tracer.trace(model, concrete_args=concrete or None)
            return fx.GraphModule(tracer.root, graph, type(model).__name__)

    try:
        gm = trace(LeafTracer(is_leaf))
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        logger.debug("plain symbolic tracing failed (%s); tracing with known shapes", first_lines(error, 1))
        try:
            gm = trace(ShapeTracer(is_leaf, dict(bound.arguments), meta_output))
        except Exception as error:  # noqa: B025 - the second attempt's error is the one reported
            raise TraceError(f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {first_lines(error)}") from error
    placeholder_values = [bound.arguments[name] for name in bound.arguments if name in given]
    return gm, placeholder_values


class _NodeError(RuntimeError):
    """A node of the traced graph failed while running on the example inputs."""

    def __init__(self, node: fx.Node, error: BaseException):
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        super().__init__(f"at node {node.name!r} ({node.op} {target}): {type(error).__name__}: {first_lines(error, 1)}")


class _ValueRecorder(fx.Interpreter):
    """Runs a GraphModule and keeps the output of every node in ``keep`` (tensors, tuples, Python values)."""

    def __init__(self, gm: fx.GraphModule, keep: set[str] | None = None, edit: EditHook | None = None):
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self._keep = keep
        self._edit = edit

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


def _onto_meta_if_mixed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Move real tensors onto ``meta`` when they meet meta tensors in one op.

    Tensors a model makes during the forward pass (``torch.arange`` without a device, position
    tables) are real while the weights are meta; an op mixing them has no kernel.
    """
    devices = {t.is_meta for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.ndim > 0}
    if devices != {True, False}:
        return args, kwargs
    return tree_map(_meta_like, args), tree_map(_meta_like, kwargs)


class _Runner(nn.Module):
    """Holds a GraphModule so that functional_call can swap its state for other weights."""

    def __init__(self, gm: fx.GraphModule, keep: set[str] | None = None, edit: EditHook | None = None):
        super().__init__()
        self.gm = gm
        self.keep = keep
        self.edit = edit
        self.recorder: _ValueRecorder | None = None

    def forward(self, *inputs: Any) -> Any:
        self.recorder = _ValueRecorder(self.gm, self.keep, self.edit)
        return self.recorder.run(*inputs)


def run_graph(
    gm: fx.GraphModule,
    inputs: list[Any],
    state: dict[str, torch.Tensor] | None = None,
    keep: set[str] | None = None,
    edit: EditHook | None = None,
) -> dict[str, Any]:
    """Run ``gm`` on ``inputs`` (optionally with ``state`` swapped in); returns node values.

    ``edit(name, value)``, when given, is called on the output of every node in ``keep`` and
    its return value replaces that output for the rest of the forward pass (the returned
    node values are the outputs before the edit).
    """
    runner = _Runner(gm, keep, edit)
    if state is None:
        runner(*inputs)
    else:
        torch.func.functional_call(runner, {f"gm.{k}": v for k, v in state.items()}, tuple(inputs), strict=False)
    assert runner.recorder is not None
    return runner.recorder.values


def _propagate(gm: fx.GraphModule, inputs: list[Any], meta_output: MetaOutput | None) -> None:
    """Write every node's value on meta tensors into ``node.meta["val"]`` (real values where that fails)."""
    evaluator = MetaEvaluator(gm, meta_output)
    pending = list(tree_map(_meta_like, inputs))
    try:
        with torch.no_grad():
            for node in gm.graph.nodes:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
                if node.op == "placeholder":  # as fx.Interpreter binds them
                    node.meta["val"] = pending if str(node.target).startswith("*") else pending.pop(0) if pending else args[0]
                elif node.op == "get_attr":
                    node.meta["val"] = evaluator.attribute(node.target)
                elif node.op != "output":
                    node.meta["val"] = evaluator.call(node.op, node.target, args, kwargs)
        return
    except Exception as error:
        logger.debug("shape propagation on meta tensors failed (%s); running a real forward pass", error)
    try:
        with torch.no_grad():
            values = run_graph(gm, inputs)
    except _NodeError as error:
        raise InputMismatchError(
            f"the example inputs do not fit the model: {error}. Check the input shapes and dtypes "
            "(--input-shape / --dtype, or example_inputs)."
        ) from error
    for node in gm.graph.nodes:
        node.meta["val"] = values.get(node.name)


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    """The real value of a ``get_attr`` target (``None`` if it cannot be read)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], is_leaf: LeafPredicate,
             meta_output: MetaOutput | None = None) -> TracedGraph:
    """Trace ``model`` with torch.fx into a :class:`TracedGraph` (see :func:`symbolic_trace`).

    ``meta_output`` answers the meta output of leaf modules whose output shape is known
    without running them (see :class:`MetaEvaluator`).
    """
    gm, placeholder_values = symbolic_trace(model, args, kwargs, is_leaf, meta_output)
    _propagate(gm, placeholder_values, meta_output)
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
        value = node.meta.get("val")
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
