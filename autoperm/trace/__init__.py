"""Tracing front-ends: torch.fx first, torch.export where symbolic tracing fails."""

from __future__ import annotations

import logging
from typing import Any, Literal

from torch import nn

from autoperm.errors import InputMismatchError, TraceError
from autoperm.trace.common import EvalMode, normalise_inputs
from autoperm.trace.export_frontend import trace_export
from autoperm.trace.fx_frontend import LeafPredicate, MetaOutput, no_extra_leaves, trace_fx
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph
from autoperm.trace.runner import GraphRunner

__all__ = [
    "OpCall",
    "TensorRef",
    "TracedGraph",
    "trace_model",
    "EvalMode",
    "GraphRunner",
    "no_extra_leaves",
]

logger = logging.getLogger(__name__)


def trace_model(
    model: nn.Module,
    example_inputs: Any,
    is_leaf: LeafPredicate = no_extra_leaves,
    tracer: Literal["auto", "fx", "export"] = "auto",
    meta_output: MetaOutput | None = None,
) -> TracedGraph:
    """Trace ``model`` (in eval mode) into a :class:`TracedGraph`.

    Args:
        model: the model; it is not modified (training flags are restored).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        is_leaf: modules to keep whole under torch.fx besides the stock ``torch.nn`` layers
            (inference passes those with a module rule).
        tracer: ``"auto"`` tries torch.fx then torch.export; or force one front-end.
        meta_output: ``meta_output(module, x)``, a leaf module's meta output on meta input ``x``
            when it is known without running the module, else ``None`` (a shortcut for shapes).

    Returns:
        The traced graph.

    Raises:
        TraceError: neither front-end could trace the model; the message gives both causes and
            what to try (register a module rule so the failing module becomes a leaf, or pass
            inputs that avoid data-dependent branches).
    """
    try:
        args, kwargs = normalise_inputs(example_inputs)
    except TypeError as error:
        raise TraceError(str(error)) from None
    errors: list[str] = []
    with EvalMode(model):
        if tracer in ("auto", "fx"):
            try:
                return trace_fx(model, args, kwargs, is_leaf, meta_output)
            except TraceError as error:
                if tracer == "fx" or isinstance(error, InputMismatchError):
                    raise
                logger.info("torch.fx failed (%s); trying torch.export", error)
                errors.append(str(error))
        try:
            return trace_export(model, args, kwargs)
        except TraceError as error:
            errors.append(str(error))
    raise TraceError(
        "could not trace the model.\n  - "
        + "\n  - ".join(errors)
        + "\nWhat to try: register a module rule for the module that fails so it is kept whole "
        "(autoperm.register_module_rule), make data-dependent branches depend on constructor "
        "arguments instead of tensor values, or check that the example inputs fit forward()."
    )

