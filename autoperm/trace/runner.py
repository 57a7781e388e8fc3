"""Run a model's traced graph and read the outputs of the nodes a spec names.

:class:`GraphRunner` is the :class:`autoperm.spec.runner.ActivationRunner` of a model: it traces
the model the way its spec was inferred (the same front-end, the same modules kept whole, so the
same node names) once per input shape, and runs that graph with any weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn

from autoperm.errors import TraceError
from autoperm.spec.runner import NodeEdit
from autoperm.spec.schema import PermutationSpec
from autoperm.trace.common import EvalMode, normalise_inputs, state_aliases
from autoperm.trace.export_frontend import export_program
from autoperm.trace.fx_frontend import run_graph, symbolic_trace

__all__ = ["GraphRunner"]


class GraphRunner:
    """The traced graph of ``model``, run on batches to record (and edit) node outputs.

    Graphs are traced once per input shape and kept: exported graphs, and fx graphs traced with
    known shapes, are specialised to the shapes they were traced with.

    Args:
        model: the model (its own weights are used unless a state dict is given; not modified).
        tracer: the front-end the spec was made with (``spec.tracer``).
        leaf_modules: qualified names of the modules to keep whole beyond torch's own layers
            (``spec.leaf_modules``).
        device: where to run; a model elsewhere is copied there.

    Example:
        >>> runner = GraphRunner.for_spec(spec, model)
        >>> values = next(runner.stream(["relu"], [x]))
    """

    def __init__(
        self,
        model: nn.Module,
        tracer: Literal["fx", "export"] = "fx",
        leaf_modules: Iterable[str] = (),
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else None
        moved = self.device is not None and self.device.type != "cpu"
        self.model = copy.deepcopy(model).to(self.device) if moved else model
        self.tracer = tracer
        names = set(leaf_modules)
        self._leaves = {id(module) for name, module in self.model.named_modules() if name in names}
        self._aliases = state_aliases(self.model)[0]
        self._graphs: dict[Any, fx.GraphModule] = {}

    @classmethod
    def for_spec(cls, spec: PermutationSpec, model: nn.Module, device: str | torch.device | None = None) -> GraphRunner:
        """The runner whose node names are those of ``spec`` (inferred from ``model``)."""
        return cls(model, spec.tracer, spec.leaf_modules, device)

    def _is_leaf(self, module: nn.Module) -> bool:
        return id(module) in self._leaves

    def graph(self, inputs: Any) -> fx.GraphModule:
        """The graph that runs ``inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs)."""
        args, kwargs = normalise_inputs(inputs)
        key = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in [*args, *kwargs.values()])
        if key not in self._graphs:
            with EvalMode(self.model), torch.no_grad():
                if self.tracer == "fx":
                    self._graphs[key] = symbolic_trace(self.model, args, kwargs, self._is_leaf)[0]
                else:
                    self._graphs[key] = export_program(self.model, args, kwargs).module()
        return self._graphs[key]

    def stream(
        self,
        nodes: Sequence[str],
        batches: Iterable[Any],
        state_dict: Mapping[str, torch.Tensor] | None = None,
        edit: NodeEdit | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{node: output}`` (detached) for each batch; see :class:`autoperm.spec.runner.ActivationRunner`.

        The model runs in eval mode without gradients; every module's training flag is restored
        once the generator is exhausted or closed. Tied weights go in once, under their
        canonical name.

        Raises:
            TraceError: a node is not in the traced graph, or does not produce a single tensor.
        """
        wanted = set(nodes)
        state = None
        if state_dict is not None:
            state = {
                name: tensor if self.device is None else tensor.to(self.device)
                for name, tensor in state_dict.items() if self._aliases.get(name, name) == name
            }
        checked = False
        with EvalMode(self.model), torch.no_grad():
            for batch in batches:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                graph = self.graph(inputs)
                if not checked:
                    checked = True
                    missing = wanted - {node.name for node in graph.graph.nodes}
                    if missing:
                        raise TraceError(f"the traced graph has no node(s) {sorted(missing)[:5]}; was the spec made for this model?")
                args, kwargs = normalise_inputs(inputs)
                values = run_graph(graph, [*args, *kwargs.values()], state, keep=wanted, edit=edit)
                recorded: dict[str, torch.Tensor] = {}
                for name in nodes:
                    value = values[name]
                    if not isinstance(value, torch.Tensor):
                        raise TraceError(f"node {name!r} does not produce a single tensor")
                    recorded[name] = value.detach()
                yield recorded
