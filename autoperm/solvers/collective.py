"""How the processes of one weight-matching run share numbers: a collective passed to the solver.

Weight matching runs the same coordinate descent in one process or on every rank of a
``torch.distributed`` process group, each rank holding a shard of both models. The solver never
asks which: it talks through a :class:`Collective` and a :class:`Placement` (which rank holds
each cost tensor), and both are trivial in one process.

- :class:`LocalCollective`: one process; every operation is the identity.
- :class:`TorchCollective`: the ranks of a ``torch.distributed`` process group (gloo or NCCL).

What the ranks agree on (:class:`Placement`): a group whose cost tensors sit on one rank is
solved there and the assignment broadcast; a group spanning ranks has its cost shares summed
onto rank 0, which solves the LAP and broadcasts it; the objective's change of every move is
summed over ranks, so every rank takes or rejects the same moves.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from autoperm.errors import SolverError
from autoperm.solvers.result import is_cost_tensor
from autoperm.spec import PermutationSpec

__all__ = ["Collective", "LocalCollective", "Placement", "TorchCollective", "place"]

Value = TypeVar("Value")


class Collective(Protocol):
    """The four operations the ranks of a weight-matching run need; every rank calls them alike."""

    rank: int

    def all_sum(self, value: float) -> float:
        """``value`` summed over ranks, on every rank."""
        ...

    def reduce_sum(self, array: np.ndarray, destination: int) -> np.ndarray:
        """``array`` summed over ranks on ``destination`` (other ranks: unspecified contents)."""
        ...

    def broadcast(self, value: Value, source: int) -> Value:
        """``source``'s ``value`` (any picklable object) on every rank."""
        ...

    def all_gather(self, value: Value) -> list[Value]:
        """Every rank's ``value``, in rank order."""
        ...


class LocalCollective:
    """One process: sums and broadcasts are the identity, and this process is rank 0."""

    rank = 0

    def all_sum(self, value: float) -> float:
        return value

    def reduce_sum(self, array: np.ndarray, destination: int) -> np.ndarray:
        return array

    def broadcast(self, value: Value, source: int) -> Value:
        return value

    def all_gather(self, value: Value) -> list[Value]:
        return [value]


class TorchCollective:
    """The ranks of a ``torch.distributed`` process group (the default one unless given).

    Sums travel as float64 tensors on the backend's device (the current CUDA device for NCCL,
    the CPU otherwise); objects are pickled by ``broadcast_object_list`` / ``all_gather_object``.

    Raises:
        SolverError: ``torch.distributed`` is not initialised.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise SolverError("distributed weight matching needs torch.distributed initialised (dist.init_process_group)")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        nccl = dist.get_backend(process_group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def all_sum(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.process_group)
        return float(tensor.item())

    def reduce_sum(self, array: np.ndarray, destination: int) -> np.ndarray:
        tensor = torch.from_numpy(array).to(self.device)
        dist.reduce(tensor, dst=destination, group=self.process_group)
        return tensor.cpu().numpy()

    def broadcast(self, value: Value, source: int) -> Value:
        box: list[Any] = [value if self.rank == source else None]
        dist.broadcast_object_list(box, src=source, group=self.process_group, device=self.device)
        return box[0]

    def all_gather(self, value: Value) -> list[Value]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.process_group)
        return gathered


@dataclass(frozen=True)
class Placement:
    """Which rank holds each cost tensor, and the collective the ranks agree through.

    Attributes:
        collective: how the ranks talk (:class:`LocalCollective` in one process).
        holder: ``{cost tensor name: rank}`` over every rank's shard, in the spec's order.
    """

    collective: Collective
    holder: dict[str, int]

    def single_holder(self, params: Collection[str]) -> int | None:
        """The one rank holding every cost tensor among ``params`` (0 when none is one), or
        ``None`` when they are spread over several ranks."""
        ranks = {self.holder[p] for p in params if p in self.holder}
        if len(ranks) > 1:
            return None
        return ranks.pop() if ranks else 0

    def whole_cost(self, local: np.ndarray | None, shape: tuple[int, ...], owner: int | None) -> tuple[np.ndarray | None, int]:
        """A group's whole cost from each rank's share, on the rank that solves its LAP.

        Args:
            local: this rank's share of the cost (``None``: no term here).
            shape: the cost's shape.
            owner: the rank holding all of the group's cost tensors, or ``None`` (spread).

        Returns:
            ``(cost, solving rank)``: the cost on the solving rank (a zero placeholder elsewhere),
            or ``None`` on every rank when no rank has a term.
        """
        collective = self.collective
        if owner is not None:
            if not collective.broadcast(local is not None, owner):
                return None, owner
            return (local if collective.rank == owner else np.zeros(shape)), owner
        if collective.all_sum(float(local is not None)) == 0.0:
            return None, 0
        total = collective.reduce_sum(np.zeros(shape) if local is None else local, 0)
        return (total if collective.rank == 0 else np.zeros(shape)), 0

    def solve_on(self, source: int, solve: Callable[[], Value]) -> Value:
        """``solve()`` run on rank ``source`` only, its result broadcast to every rank."""
        result = solve() if self.collective.rank == source else None
        return self.collective.broadcast(result, source)  # type: ignore[return-value]


def place(
    spec: PermutationSpec,
    shard_a: Mapping[str, torch.Tensor],
    shard_b: Mapping[str, torch.Tensor],
    collective: Collective,
) -> Placement:
    """Check this rank's shards and learn from every rank which one holds each cost tensor.

    Args:
        spec: the permutation spec.
        shard_a, shard_b: this rank's slices of the two state dicts (the whole state dicts in one
            process), with the same tensor names.
        collective: how the ranks talk.

    Returns:
        The :class:`Placement` of the cost tensors.

    Raises:
        SolverError: the two shards differ in names or shapes, a tensor is held by two ranks,
            or no rank holds a cost tensor of the spec.
    """
    rank = collective.rank
    if shard_a.keys() != shard_b.keys():
        only = sorted(set(shard_a) ^ set(shard_b))[:5]
        raise SolverError(f"rank {rank}: shards of A and B hold different tensors, e.g. {only}; give both models the same slice")
    for name, tensor in shard_a.items():
        expected = spec.shapes.get(name)
        for model, t in (("A", tensor), ("B", shard_b[name])):
            if expected is not None and tuple(t.shape) != tuple(expected):
                raise SolverError(f"rank {rank}: {model}'s {name!r} has shape {list(t.shape)}, the spec says {list(expected)}")
    local = [name for name in spec.members_by_param if name in shard_a and is_cost_tensor(name, shard_a[name])]
    holder: dict[str, int] = {}
    for other, names in enumerate(collective.all_gather(local)):
        for name in names or ():
            if name in holder:
                raise SolverError(f"cost tensor {name!r} is held by ranks {holder[name]} and {other}; give each tensor to one rank")
            holder[name] = other
    missing = [p for p in spec.members_by_param if p in spec.shapes and p not in holder and _floating(p, shard_a)]
    if missing:
        raise SolverError(f"no rank holds the cost tensor(s) {missing[:5]}; the shards must cover the spec")
    return Placement(collective, {name: holder[name] for name in spec.members_by_param if name in holder})


def _floating(name: str, shard: Mapping[str, torch.Tensor]) -> bool:
    """Whether a parameter no rank listed would be a cost tensor (running statistics are not)."""
    tensor = shard.get(name)
    return is_cost_tensor(name, tensor if tensor is not None else torch.empty(0))
