"""Tracing front-ends: torch.fx first, torch.export where symbolic tracing fails."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from autoperm.errors import InputMismatchError, TraceError
from autoperm.trace.common import normalise_inputs
from autoperm.trace.export_frontend import export_program, trace_export
from autoperm.trace.fx_frontend import LeafPredicate, MetaOutput, no_extra_leaves, run_graph, symbolic_trace, trace_fx
from autoperm.trace.graph import OpCall, TensorRef, TracedGraph

__all__ = [
    "OpCall",
    "TensorRef",
    "TracedGraph",
    "trace_model",
    "record_activations",
    "stream_activations",
    "runnable_graph",
    "no_extra_leaves",
]

logger = logging.getLogger(__name__)


class _EvalMode:
    """Put a model in eval mode with caching off for tracing; restore everything afterwards.

    Models with a key/value cache (every causal LM of ``transformers``, whose configs default to
    ``use_cache=True``) return cache objects that neither front-end can trace and that are no
    function of the weights worth comparing; their ``config.use_cache`` (and that of nested
    configs, e.g. ``text_config``) is switched off while tracing, so default configs trace.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []
        self.caches: list[Any] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.caches = _cache_switches(self.model)
        for config in self.caches:
            config.use_cache = False
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for module, flag in self.flags:
            module.training = flag
        for config in self.caches:
            config.use_cache = True


def _cache_switches(model: nn.Module) -> list[Any]:
    """The configs reachable from ``model``'s modules whose ``use_cache`` is on (each once)."""
    found: dict[int, Any] = {}
    pending = [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or isinstance(config, (str, int, float, bool, torch.Tensor)):
            continue
        if getattr(config, "use_cache", None) is True:
            found[id(config)] = config
        else:
            found.setdefault(id(config), None)
        for name in ("text_config", "decoder", "encoder", "language_config", "llm_config"):
            pending.append(getattr(config, name, None))
    return [config for config in found.values() if config is not None]


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
    with _EvalMode(model):
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


def runnable_graph(
    model: nn.Module,
    example_inputs: Any,
    tracer: Literal["fx", "export"] = "fx",
    is_leaf: LeafPredicate = no_extra_leaves,
) -> torch.fx.GraphModule:
    """The graph module that :func:`stream_activations` runs, built once for repeated passes.

    Its node names are those of :func:`trace_model` with the same front-end and leaf predicate
    (and so of ``ActivationSite.node`` when ``is_leaf`` is the one inference used).
    """
    args, kwargs = normalise_inputs(example_inputs)
    with _EvalMode(model), torch.no_grad():
        if tracer == "fx":
            return symbolic_trace(model, args, kwargs, is_leaf)[0]
        return export_program(model, args, kwargs).module()


def stream_activations(
    model: nn.Module,
    nodes: Sequence[str],
    batches: Iterable[Any],
    tracer: Literal["fx", "export"] = "fx",
    state_dict: dict[str, torch.Tensor] | None = None,
    is_leaf: LeafPredicate = no_extra_leaves,
    edit: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    graph: torch.fx.GraphModule | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Run the traced graph of ``model`` on each batch and yield the outputs of ``nodes``.

    Node names are those of the graph the spec was inferred from (``ActivationSite.node``).
    The model runs in eval mode without gradients; every module's training flag is restored
    once the generator is exhausted or closed.

    Args:
        model: the model (its own weights are used unless ``state_dict`` is given).
        nodes: traced-graph node names to record.
        batches: inputs; a batch is a tensor, or a tuple/list whose first element is the input.
        tracer: the front-end the spec was made with (``spec.tracer``).
        state_dict: weights to run with instead of the model's own.
        is_leaf: the leaf predicate inference traced with (see :func:`trace_model`; by default only
            the stock ``torch.nn`` layers are leaves, as there).
        edit: ``edit(node, output)`` returns the tensor that replaces that node's output for the
            rest of the forward pass (REPAIR renormalises channels this way); the yielded
            values are the outputs before the edit.
        graph: the graph to run, from :func:`runnable_graph` (by default one is traced for each
            input shape met: exported graphs, and fx graphs traced with known shapes, are
            specialised to the shapes they were traced with).

    Yields:
        ``{node name: activation}`` (detached) for each batch.

    Raises:
        TraceError: a node is not in the traced graph, or does not produce a single tensor.
    """
    wanted = set(nodes)
    graphs: dict[Any, torch.fx.GraphModule] = {}
    checked = False
    with _EvalMode(model), torch.no_grad():
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            args, kwargs = normalise_inputs(inputs)
            graph_module = graph
            if graph_module is None:
                key = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in list(args) + list(kwargs.values()))
                if key not in graphs:
                    graphs[key] = runnable_graph(model, inputs, tracer, is_leaf)
                graph_module = graphs[key]
            if not checked:
                checked = True
                missing = wanted - {n.name for n in graph_module.graph.nodes}
                if missing:
                    raise TraceError(f"the traced graph has no node(s) {sorted(missing)[:5]}; was the spec made for this model?")
            values = run_graph(graph_module, list(args) + list(kwargs.values()), state_dict, keep=wanted, edit=edit)
            recorded: dict[str, torch.Tensor] = {}
            for name in nodes:
                value = values[name]
                if not isinstance(value, torch.Tensor):
                    raise TraceError(f"node {name!r} does not produce a single tensor")
                recorded[name] = value.detach()
            yield recorded


def record_activations(
    model: nn.Module,
    nodes: Sequence[str],
    batches: Iterable[Any],
    tracer: Literal["fx", "export"] = "fx",
    state_dict: dict[str, torch.Tensor] | None = None,
    is_leaf: LeafPredicate = no_extra_leaves,
) -> dict[str, list[torch.Tensor]]:
    """Run the traced graph of ``model`` on each batch and keep the outputs of ``nodes``.

    See :func:`stream_activations` for the arguments.

    Returns:
        ``{node name: [activation of each batch]}`` (detached).
    """
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in nodes}
    for values in stream_activations(model, nodes, batches, tracer, state_dict, is_leaf):
        for name in nodes:
            recorded[name].append(values[name])
    return recorded
