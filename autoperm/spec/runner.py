"""What a spec consumer needs from a model: the values of the nodes the spec names.

Activation matching reads each group's ``activations`` and REPAIR the spec's ``affine_sites``;
both name nodes of the graph the spec was traced from. They get those nodes' values from an
:class:`ActivationRunner` and never look at the graph themselves: the runner that traces the
model (:class:`autoperm.trace.GraphRunner`) is handed in by the caller (the top-level API and
the CLI), so the solvers and evaluation depend on this protocol only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

__all__ = ["ActivationRunner", "NodeEdit", "record_activations"]

NodeEdit = Callable[[str, torch.Tensor], torch.Tensor]


class ActivationRunner(Protocol):
    """Runs a model on batches and yields the outputs of named graph nodes."""

    def stream(self, nodes: Sequence[str], batches: Iterable[Any], state_dict: Mapping[str, torch.Tensor] | None = None,
               edit: NodeEdit | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{node: output}`` (detached) for each batch, in eval mode without gradients.

        Args:
            nodes: node names (``ActivationSite.node``, ``AffineSite.node``).
            batches: inputs; a batch is a tensor, or a tuple/list whose first element is the input.
            state_dict: weights to run with instead of the model's own.
            edit: ``edit(node, output)`` returns the tensor that replaces that node's output for
                the rest of the pass; the yielded values are the outputs before the edit.
        """
        ...


def record_activations(
    runner: ActivationRunner, nodes: Sequence[str], batches: Iterable[Any], state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """``{node: [output of each batch]}`` from ``runner``; see :meth:`ActivationRunner.stream`."""
    recorded: dict[str, list[torch.Tensor]] = {node: [] for node in nodes}
    for values in runner.stream(nodes, batches, state_dict):
        for node in nodes:
            recorded[node].append(values[node])
    return recorded
