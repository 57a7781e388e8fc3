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

The solver is the single-process one (:mod:`autoperm.solvers.weight_matching`), given a
:class:`autoperm.solvers.collective.TorchCollective` instead of the local one; the ranks agree
through :class:`autoperm.solvers.collective.Placement`. :func:`shard_parameters` splits a spec's
parameters into contiguous slices that keep each attention block's tensors together.

Communication per sweep: one ``8 n^2``-byte reduce per visit of each spanning group of size
``n`` (the residual stream of LLaMA-7B, ``n = 4096``: 128 MiB), a broadcast of ``8 n`` bytes
per group visit, and one 8-byte all-reduce per proposed move.

Launch one process per GPU (or per CPU slice) with ``torchrun``::

    torchrun --nproc-per-node 8 my_match.py   # calls dist.init_process_group("nccl") and
                                              # weight_matching(..., distributed=True, device="cuda")
"""

from __future__ import annotations

import math

from autoperm.errors import SolverError
from autoperm.spec import PermutationSpec

__all__ = ["shard_parameters"]


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
