"""The traced graph both front-ends (torch.fx and torch.export) produce for the rule engine.

A :class:`TracedGraph` is a list of :class:`OpCall` s in topological order over
:class:`TensorRef` s. State-dict tensors (parameters and persistent buffers) carry their
state-dict name; model inputs and outputs are listed so the engine can keep their axes fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["TensorRef", "OpCall", "TracedGraph", "invariant_axes", "tensors_in"]


@dataclass(frozen=True)
class TensorRef:
    """One tensor value of the traced graph.

    Attributes:
        id: unique id (the graph node name, with ``[i]`` for the i-th element of a tuple output).
        shape: concrete shape.
        state_name: state-dict name if the tensor is a parameter or persistent buffer.
        constant: a tensor that is neither an input nor in the state dict (its axes stay fixed,
            except its ``invariant_axes``).
        invariant_axes: axes of a constant along which every slice is the same (a zero bias kept
            out of the state dict; a blur filter repeated for every channel): permuting them leaves
            the constant unchanged, so they may move with the tensors they meet.
    """

    id: str
    shape: tuple[int, ...]
    state_name: str | None = None
    constant: bool = False
    floating: bool = True
    invariant_axes: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class OpCall:
    """One operation as traced, before the rule engine names its arguments.

    Attributes:
        node: name of the graph node (for messages and activation sites).
        key: what the rule table is looked up by: the callable (``torch.add``, ``F.relu``),
            ``"method:<name>"`` for tensor methods, ``"aten.<name>"`` for ATen ops, or the
            module instance's type for module calls.
        target: human-readable original target (``torch.add``, ``aten.add.Tensor``, ``Conv2d``).
        args: positional arguments, tensors as :class:`TensorRef`.
        kwargs: keyword arguments, tensors as :class:`TensorRef`.
        outputs: output tensors, flattened (a tuple output gives one ref per element, ``None``
            for elements that are not tensors).
        module: for a module call, the module instance; ``module_name`` its qualified name.
        arg_names: names of the positional arguments when the front-end knows them (ATen schemas).
        module_state: for a module call, the module's own state-dict names (relative).
    """

    node: str
    key: Any
    target: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[TensorRef | None]
    module: Any = None
    module_name: str | None = None
    arg_names: tuple[str, ...] | None = None
    module_state: tuple[str, ...] = ()

    def tensors(self) -> list[TensorRef]:
        """Every tensor among the arguments, in order."""
        return tensors_in([self.args, self.kwargs])

    def output_tensors(self) -> list[TensorRef]:
        return [t for t in self.outputs if t is not None]

    def describe(self) -> str:
        where = f" in module {self.module_name!r}" if self.module_name else ""
        return f"node {self.node!r} ({self.target}{where})"


@dataclass
class TracedGraph:
    """A model as the rule engine sees it."""

    calls: list[OpCall]
    inputs: list[TensorRef]
    outputs: list[TensorRef]
    state: dict[str, TensorRef]
    aliases: dict[str, str] = field(default_factory=dict)
    tracer: Literal["fx", "export"] = "fx"
    constants: list[TensorRef] = field(default_factory=list)


def tensors_in(value: Any) -> list[TensorRef]:
    """All :class:`TensorRef` s in a nested structure of lists, tuples and dicts."""
    found: list[TensorRef] = []

    def walk(item: Any) -> None:
        if isinstance(item, TensorRef):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            for sub in item:
                walk(sub)
        elif isinstance(item, dict):
            for sub in item.values():
                walk(sub)

    walk(value)
    return found


def invariant_axes(value: object) -> tuple[int, ...]:
    """Axes of a real (not meta or fake) tensor along which every slice equals the first one."""
    if not isinstance(value, torch.Tensor) or value.device.type == "meta" or value.numel() < 2:
        return ()
    try:
        tensor = value.detach()
        return tuple(d for d in range(tensor.dim()) if tensor.shape[d] > 1 and bool((tensor == tensor.narrow(d, 0, 1)).all()))
    except Exception:  # fake or otherwise unreadable tensors
        return ()
