"""torch.export front-end, for models that symbolic tracing cannot handle.

The exported ATen graph lifts parameters and buffers to placeholders; the graph signature maps
them back to their state-dict names. ATen ops are looked up in the rule table as
``"aten.<name>"`` so an op's rule is written once for both front-ends.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind

from autoperm.errors import TraceError
from autoperm.trace.common import convert_arguments, first_lines, refs_for_value, state_aliases
from autoperm.trace.fx_frontend import _structure
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph, invariant_axes, tensors_in

__all__ = ["trace_export", "export_program"]

logger = logging.getLogger(__name__)


def export_program(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) with errors turned into :class:`TraceError`."""
    try:
        return torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as error:
        raise TraceError(f"torch.export could not export {type(model).__name__}: {type(error).__name__}: {first_lines(error)}") from error


def _constant_value(program: torch.export.ExportedProgram, model: nn.Module, spec: Any) -> Any:
    """The real value of a lifted constant or non-persistent buffer (``None`` if unknown)."""
    target = getattr(spec, "target", None) if spec is not None else None
    if target is None:
        return None
    if target in program.constants:
        return program.constants[target]
    try:
        return model.get_buffer(target)
    except (AttributeError, TypeError):
        return None


def trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TracedGraph:
    """Export ``model`` and convert the ATen graph into a :class:`TracedGraph`."""
    program = export_program(model, args, kwargs)
    aliases, tensors = state_aliases(model)
    signature = program.graph_signature
    state: dict[str, TensorRef] = {}
    inputs: list[TensorRef] = []
    outputs: list[TensorRef] = []
    constants: list[TensorRef] = []
    converted: dict[str, Any] = {}
    calls: list[OpCall] = []
    kinds = {spec.arg.name: spec for spec in signature.input_specs if hasattr(spec.arg, "name")}


    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder":
            spec = kinds.get(node.name)
            refs = refs_for_value(node.name, value)
            if spec is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in aliases:
                canonical = aliases[spec.target]
                ref = state.get(canonical) or TensorRef(
                    f"state:{canonical}", tuple(value.shape), state_name=canonical, floating=value.is_floating_point()
                )
                state[canonical] = ref
                converted[node.name] = ref
            elif spec is not None and spec.kind == InputKind.USER_INPUT:
                inputs.extend(r for r in refs if r is not None)
                converted[node.name] = _structure(value, refs)
            else:
                real = _constant_value(program, model, spec)
                for ref in refs:
                    if ref is not None:
                        constants.append(TensorRef(ref.id, ref.shape, constant=True, floating=ref.floating,
                                                   invariant_axes=invariant_axes(real) if len(refs) == 1 else ()))
                converted[node.name] = _structure(value, [TensorRef(r.id, r.shape, constant=True) if r else None for r in refs])
        elif node.op == "call_function":
            refs = refs_for_value(node.name, value)
            converted[node.name] = _structure(value, refs)
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                key: Any = f"{target.namespace}.{target.overloadpacket.__name__}"
                described = str(target)
                arg_names: tuple[str, ...] | None = tuple(
                    "input" if a.name == "self" else a.name for a in target._schema.arguments
                )
            else:
                key = target
                described = getattr(target, "__name__", str(target))
                arg_names = None
            call_args = convert_arguments(node.args, converted)
            call_kwargs = convert_arguments(dict(node.kwargs), converted)
            calls.append(OpCall(node.name, key, described, call_args, call_kwargs, refs, arg_names=arg_names))
        elif node.op == "output":
            user = [spec.kind == OutputKind.USER_OUTPUT for spec in signature.output_specs]
            values = list(node.args[0])
            for is_user, item in zip(user, values):
                if is_user:
                    outputs.extend(tensors_in(convert_arguments(item, converted)))
    for name, tensor in tensors.items():
        if name not in state:
            state[name] = TensorRef(f"state:{name}", tuple(tensor.shape), state_name=name, floating=tensor.is_floating_point())
    return TracedGraph(calls, inputs, outputs, state, aliases, "export", constants)
