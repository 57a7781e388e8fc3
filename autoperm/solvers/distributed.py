"""Weight matching across processes with ``torch.distributed``: each rank holds a slice of both models.

``weight_matching(spec, shard_a, shard_b, distributed=True)`` runs the same coordinate descent as
the single-process solver (Git Re-Basin, arXiv 2209.04836), on every rank of the default process
group at once, each rank holding only its shard of the two state dicts (the same names in both):

- a group whose cost tensors all sit on one rank (a layer's MLP group, attention heads and their
  within-head dimensions) is solved by that rank alone, which broadcasts the assignment;
- a group spanning ranks (the residual stream) has every rank compute its share of the cost
  ``sum_m A_m @ B_m'^T`` over the members it holds; the shares are summed onto rank 0
  (``reduce``), which solves the LAP and broadcasts the assignment;
- the objective's change of every move is summed over ranks (``all_reduce`` of one number), so
  every rank takes or rejects the same moves and ends with the same permutations as one process.

The per-group cost code is the single-process solver's (:mod:`autoperm.solvers.weight_matching`);
this module only adds the collectives. :func:`shard_parameters` splits a spec's parameters into
contiguous slices that keep each attention block's tensors together.

Communication per sweep: one ``8 n^2``-byte reduce per visit of each spanning group of size
``n`` (the residual stream of LLaMA-7B, ``n = 4096``: 128 MiB), a broadcast of ``8 n`` bytes
per group visit, and one 8-byte all-reduce per proposed move.

Launch one process per GPU (or per CPU slice) with ``torchrun``::

    torchrun --nproc-per-node 8 my_match.py   # calls dist.init_process_group("nccl") and
                                              # weight_matching(..., distributed=True, device="cuda")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from autoperm.errors import SolverError
from autoperm.solvers.lap import LapMethod
from autoperm.solvers.result import is_cost_tensor
from autoperm.solvers.weight_matching import _CoordinateDescent
from autoperm.spec import PermutationGroup, PermutationSpec

__all__ = ["DistributedCoordinateDescent", "shard_parameters"]


def shard_parameters(spec: PermutationSpec, world_size: int) -> list[list[str]]:
    """Split the spec's parameters into ``world_size`` contiguous slices of about equal size.

    Parameters that must be solved together stay on one rank: the tensors of every group that
    others are fibred over (attention heads) and of its fibres, and the tensors of every group
    whose tensors are few (at most an eighth of a slice: a layer's MLP group), so that only wide
    groups such as the residual stream need their costs summed across ranks.

    Args:
        spec: the permutation spec (its ``shapes`` give the sizes and the order).
        world_size: the number of ranks.

    Returns:
        One list of parameter names per rank, in the spec's order.

    Raises:
        SolverError: the spec has no shapes, or ``world_size`` is below 1.
    """
    if world_size < 1:
        raise SolverError(f"world_size must be at least 1, got {world_size}")
    if not spec.shapes:
        raise SolverError("shard_parameters needs a spec with shapes (infer it from the model)")
    names = list(spec.shapes)
    size = {name: math.prod(spec.shapes[name]) for name in names}
    root = {name: name for name in names}

    def find(name: str) -> str:
        while root[name] != name:
            root[name] = root[root[name]]
            name = root[name]
        return name

    budget = sum(size.values()) / world_size / 8
    fibred_over = {g.per for g in spec.active_groups if g.per is not None}
    for group in spec.active_groups:
        params = sorted({m.param for m in group.members if m.param in root})
        together = {m.param for g in spec.active_groups if g.per == group.name for m in g.members}
        if group.name in fibred_over:
            params = sorted(set(params) | together)
        elif sum(size[p] for p in params) > budget:
            continue
        for param in params[1:]:
            root[find(param)] = find(params[0])
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(find(name), []).append(name)
    shards: list[list[str]] = [[] for _ in range(world_size)]
    target = sum(size.values()) / world_size
    filled = 0
    for unit in units.values():
        rank = min(world_size - 1, int(filled / target)) if target else 0
        shards[rank].extend(unit)
        filled += sum(size[p] for p in unit)
    order = {name: i for i, name in enumerate(names)}
    return [sorted(shard, key=order.__getitem__) for shard in shards]


class DistributedCoordinateDescent(_CoordinateDescent):
    """The single-process solver's state on one rank, with the collectives that keep ranks in step.

    Every rank must call the same methods in the same order (the sweep loop of
    :func:`autoperm.weight_matching` does); the process group must be initialised.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        shard_a: Mapping[str, torch.Tensor],
        shard_b: Mapping[str, torch.Tensor],
        perms: dict[str, torch.Tensor],
        device: torch.device,
        lap: LapMethod = "auto",
        cache_bytes: int | None = None,
        process_group: dist.ProcessGroup | None = None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise SolverError("distributed weight matching needs torch.distributed initialised (dist.init_process_group)")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
        local = _check_shard(spec, shard_a, shard_b, self.rank)
        gathered: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, local, group=process_group)
        self.holder: dict[str, int] = {}
        for rank, names in enumerate(gathered):
            for name in names or ():
                if name in self.holder:
                    raise SolverError(f"cost tensor {name!r} is held by ranks {self.holder[name]} and {rank}; give each tensor to one rank")
                self.holder[name] = rank
        missing = [p for p in spec.members_by_param if p in spec.shapes and p not in self.holder and _floating(spec, p, shard_a)]
        if missing:
            raise SolverError(f"no rank holds the cost tensor(s) {missing[:5]}; the shards must cover the spec")
        cost_params = [name for name in spec.members_by_param if name in self.holder]
        self.owner = {g.name: self._single_holder({m.param for m in g.members}) for g in spec.active_groups}
        self.source = 0
        super().__init__(spec, shard_a, shard_b, perms, device, lap=lap, cache_bytes=cache_bytes, cost_params=cost_params)

    def _single_holder(self, params: set[str]) -> int | None:
        """The one rank holding every cost tensor among ``params``, or ``None``."""
        ranks = {self.holder[p] for p in params if p in self.holder}
        return ranks.pop() if len(ranks) == 1 else None

    # -------------------------------------------------------------- collectives
    def _total(self, value: float) -> float:
        """The sum of ``value`` over ranks."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor, group=self.process_group)
        return float(tensor.item())

    def _broadcast(self, value: object, source: int) -> object:
        box = [value if self.rank == source else None]
        dist.broadcast_object_list(box, src=source, group=self.process_group, device=self.comm_device)
        return box[0]

    def _cost(self, group: PermutationGroup) -> np.ndarray | None:
        """This rank's share of the cost, summed onto the rank that solves the LAP.

        Every rank runs the single-process ``_cost`` (its bookkeeping must stay identical on all
        ranks); ranks other than the solving one return a zero placeholder of the right shape.
        """
        local = super()._cost(group)
        shape = (self.spec[group.per].size, group.size, group.size) if group.per is not None else (group.size, group.size)
        owner = self.owner.get(group.name)
        if owner is not None:
            self.source = owner
            if not self._broadcast(local is not None, owner):
                return None
            return local if self.rank == owner else np.zeros(shape)
        self.source = 0
        if self._total(float(local is not None)) == 0.0:
            return None
        total = torch.zeros(shape, dtype=torch.float64, device=self.comm_device) if local is None else torch.from_numpy(local).to(self.comm_device)
        dist.reduce(total, dst=0, group=self.process_group)
        return total.cpu().numpy() if self.rank == 0 else np.zeros(shape)

    def _assignment(self, cost: np.ndarray, current: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """The solving rank's LAP, broadcast to every rank."""
        result = super()._assignment(cost, current) if self.rank == self.source else None
        return self._broadcast(result, self.source)  # type: ignore[return-value]

    def _solve_shared(
        self,
        group: PermutationGroup,
        within: PermutationGroup,
        perms: Mapping[str, torch.Tensor],
        leave_out: frozenset[str] = frozenset(),
    ) -> tuple[dict[str, torch.Tensor], float, float] | None:
        """Not solved jointly across ranks: heads and a shared within-head group are left to
        coordinate descent (their tensors usually span the residual stream, so every rank's)."""
        return None

    def _solve_part(
        self,
        group: PermutationGroup,
        part: Sequence[PermutationGroup],
        perms: Mapping[str, torch.Tensor],
        leave_out: frozenset[str] = frozenset(),
    ) -> tuple[dict[str, torch.Tensor], float, float]:
        """Heads and one part of their fibres, solved by the rank holding their tensors."""
        params = {m.param for g in (group, *part) for m in g.members}
        owner = self._single_holder(params)
        if owner is None:
            ranks = sorted({self.holder[p] for p in params if p in self.holder})
            raise SolverError(
                f"the tensors of head group {group.name!r} and its within-head groups are spread over ranks {ranks}; "
                "keep each attention block on one rank (autoperm.solvers.distributed.shard_parameters does)"
            )
        result = super()._solve_part(group, part, perms, leave_out) if self.rank == owner else None
        return self._broadcast(result, owner)  # type: ignore[return-value]


def _floating(spec: PermutationSpec, name: str, shard: Mapping[str, torch.Tensor]) -> bool:
    """Whether a parameter no rank listed would be a cost tensor (running statistics are not)."""
    tensor = shard.get(name)
    return is_cost_tensor(name, tensor if tensor is not None else torch.empty(0))


def _check_shard(spec: PermutationSpec, shard_a: Mapping[str, torch.Tensor], shard_b: Mapping[str, torch.Tensor], rank: int) -> list[str]:
    """This rank's cost tensors, after checking the two shards against each other and the spec."""
    if shard_a.keys() != shard_b.keys():
        only = sorted(set(shard_a) ^ set(shard_b))[:5]
        raise SolverError(f"rank {rank}: shards of A and B hold different tensors, e.g. {only}; give both models the same slice")
    for name, tensor in shard_a.items():
        expected = spec.shapes.get(name)
        for model, t in (("A", tensor), ("B", shard_b[name])):
            if expected is not None and tuple(t.shape) != tuple(expected):
                raise SolverError(f"rank {rank}: {model}'s {name!r} has shape {list(t.shape)}, the spec says {list(expected)}")
    return [name for name in spec.members_by_param if name in shard_a and is_cost_tensor(name, shard_a[name])]
