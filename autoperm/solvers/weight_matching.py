"""Weight matching by coordinate descent over permutation groups (Git Re-Basin, arXiv 2209.04836).

Maximises ``sum <W_A, pi(W_B)>_F`` over the permutations ``pi`` of a spec: visit the groups in a
fresh random order each sweep and solve one linear assignment problem per group, with every
other group held at its current permutation. Ito et al. (arXiv 2402.04051) analyse why the
result connects the two models linearly.

Three pieces, one concern each: :class:`_CoordinateDescent` here is the schedule (which group
next, which need solving again); :class:`autoperm.solvers.costs.CostCache` keeps the cost
products up to date; a :class:`autoperm.solvers.collective.Placement` makes the ranks of a
distributed run agree (in one process it does nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from autoperm.errors import SolverError
from autoperm.solvers.collective import LocalCollective, Placement, TorchCollective, place
from autoperm.solvers.costs import CostCache, PermutationState, cost_terms
from autoperm.solvers.heads import (
    attach_fibres,
    carry_fibres,
    fibre_parts,
    fibred_over,
    shared_within,
    solve_heads,
    solve_shared,
)
from autoperm.solvers.lap import LapMethod, linear_assignment
from autoperm.solvers.result import MatchingResult, check_state_dicts, is_improvement
from autoperm.spec import PermutationGroup, PermutationSpec, check_permutations, identity_permutation

__all__ = ["weight_matching"]

logger = logging.getLogger(__name__)

SweepCallback = Callable[[int, float], None]
"""Called after every sweep with the sweep number (from 1) and the objective."""

GroupCallback = Callable[[int, int], None]
"""Called after every group visit with the groups visited so far in this sweep and the groups per sweep."""


def weight_matching(
    spec: PermutationSpec,
    state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    init_perms: Mapping[str, torch.Tensor] | None = None,
    tol: float = 1e-12,
    callback: SweepCallback | None = None,
    groups: Collection[str] | None = None,
    first_sweep: Literal["graph", "random"] = "graph",
    lap: LapMethod = "auto",
    distributed: bool = False,
    cache_bytes: int | None = None,
    group_callback: GroupCallback | None = None,
) -> MatchingResult:
    """Find permutations of model B that bring its weights closest to model A's.

    Coordinate descent (Ainsworth et al., "Git Re-Basin", arXiv 2209.04836, Algorithm 1): start
    at the identity (or ``init_perms``); each sweep visits the active groups (the first one from
    input to output, see ``first_sweep``, later ones in a fresh random order) and, for group ``g``, solves ``max_P sum_i C[i, P[i]]`` with
    ``C = sum_m A_m @ B_m'^T`` over the members ``m`` of ``g``, where ``B_m'`` has every other
    axis already permuted. BatchNorm running statistics are left out of the cost (they move with
    the permutation when it is applied). Stops after a sweep in which no group improves the
    objective by more than ``tol`` (relative to ``max(1, |objective|)``).

    Fibred groups (within-head dimensions) are solved row by row: each head of A against the head
    of B the head group currently assigns to it.

    Args:
        spec: the permutation spec of the architecture.
        state_dict_a: the reference model's state dict (left unchanged).
        state_dict_b: the state dict to permute (left unchanged).
        max_iter: the most sweeps.
        seed: seeds the random group order of every sweep.
        device: where the cost matmuls run (``"cuda"`` if available is much faster for big models).
        init_perms: starting permutations (missing groups start at the identity).
        tol: relative improvement below which a sweep counts as no progress.
        callback: called after each sweep with ``(sweep, objective)`` (progress bars).
        groups: solve only these groups; the others stay at ``init_perms`` (default: all).
        first_sweep: ``"graph"`` (default) makes the first sweep an informed initialisation:
            it visits the groups in the order of the spec, from the input towards the output,
            and each group's cost leaves out the terms that depend on groups not visited yet,
            itself on another axis of the same tensor included (while those are at the identity
            their terms are noise; with ``init_perms`` the
            first sweep uses every term, in graph order). Later sweeps use every
            term in a fresh random order. ``"random"`` is Git Re-Basin's schedule from the
            first sweep on. From the identity, a random first sweep can lock models into poor
            local optima: on a planted permutation of ViT-B/16 it recovered none of 49 groups,
            on MobileNetV3 and EfficientNet-B0 a large share stayed wrong; the informed first
            sweep recovers all of them.
        lap: the linear assignment backend (:func:`autoperm.solvers.lap.linear_assignment`):
            ``"auto"`` (each row's best column when those are distinct, an exact ``O(n^2)``
            shortcut; else lapx on planted-like costs when installed, else scipy), ``"scipy"``,
            ``"lapx"`` or ``"auction"`` (torch; within a certified gap of the optimum).
        distributed: run on every rank of the initialised ``torch.distributed`` process group,
            each rank passing its shard of both state dicts (the same tensor names in A and B);
            every rank returns the same result, equal to one process's on the whole models
            (:mod:`autoperm.solvers.distributed`).
        cache_bytes: the most memory for cached ``n x n`` cost products; beyond it products are
            recomputed on each visit. Default: the size of the two models' cost tensors, but no
            more than a sixteenth of it once that is above 64 MiB (512 MiB for a
            TinyLlama-1.1B pair in float32), so that large models stay near their own size.
        group_callback: called after each group visit with ``(groups visited in this sweep,
            groups per sweep)`` (progress bars within a sweep).

    Returns:
        A :class:`MatchingResult`; ``history[0]`` is the objective at the start.

    Raises:
        SolverError: the state dicts differ in keys or shapes, or do not fit the spec; with
            ``distributed``, no process group is initialised or the shards do not cover the spec.

    Complexity:
        Per sweep, one LAP per group (``O(n^3)``) plus a matmul per member whose other axes
        changed (``O(n^2 k)`` for a tensor of ``n k`` entries); later sweeps touch few members.

    Example:
        >>> res = weight_matching(spec, model_a.state_dict(), model_b.state_dict())
        >>> aligned_b = apply_permutation(spec, res.perms, model_b.state_dict())
    """
    if not distributed:
        check_state_dicts(spec, [state_dict_a, state_dict_b])
    if groups is not None:
        _validate_groups(spec, groups)
    perms = identity_permutation(spec)
    if init_perms is not None:
        check_permutations(spec, init_perms)
        perms.update({name: p.clone().to(torch.long).cpu() for name, p in init_perms.items() if name in perms})
    placement = place(spec, state_dict_a, state_dict_b, TorchCollective() if distributed else LocalCollective())
    solver = _CoordinateDescent(
        spec, state_dict_a, state_dict_b, perms, [g for g in spec.active_groups if groups is None or g.name in groups],
        placement, torch.device(device), seed=seed, tol=tol, lap=lap, cache_bytes=cache_bytes,
        informed=first_sweep == "graph" and init_perms is None,  # a given start is not the identity
    )
    history = [solver.value]
    converged = False
    sweep = 0
    for sweep in range(1, max_iter + 1):
        improved = solver.sweep(group_callback)
        history.append(solver.value)
        logger.debug("weight matching sweep %d: objective %.6g", sweep, history[-1])
        if callback is not None:
            callback(sweep, history[-1])
        if not improved:
            converged = True
            break
    logger.info(
        "weight matching: objective %.6g -> %.6g in %d sweep(s)%s",
        history[0], history[-1], sweep, "" if converged else " (not converged)",
    )
    return MatchingResult(perms=solver.state.perms, objective=history[-1], n_iter=sweep, converged=converged, history=history)


class _CoordinateDescent:
    """The schedule of one weight-matching run: which group to solve next and which need it again.

    The whole bookkeeping of the schedule lives here: ``pending`` (groups an informed first sweep
    has not visited yet, whose terms it leaves out), ``informed`` (the first sweep is informed:
    moves are taken on partial costs) and ``solved_at`` (per group, the versions of it and of
    the groups its cost depends on when it was last solved on its whole cost: while they are
    unchanged the LAP would return the current permutation again, so the group is skipped).
    Costs come from a :class:`CostCache`; every rank of a distributed run holds one of these,
    calls the same methods in the same order, and agrees with the others through ``placement``.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_dict_a: Mapping[str, torch.Tensor],
        state_dict_b: Mapping[str, torch.Tensor],
        perms: dict[str, torch.Tensor],
        groups: Sequence[PermutationGroup],
        placement: Placement,
        device: torch.device,
        seed: int = 0,
        tol: float = 1e-12,
        lap: LapMethod = "auto",
        cache_bytes: int | None = None,
        informed: bool = True,
    ):
        self.spec = spec
        self.groups = list(groups)
        self.placement = placement
        self.generator = np.random.default_rng(seed)
        self.tol = tol
        self.lap: LapMethod = lap
        self.state = PermutationState(perms)
        names = list(placement.holder)  # every cost tensor, also those other ranks hold
        held = [name for name in names if name in state_dict_a]
        self.cache = CostCache(spec, state_dict_a, state_dict_b, held, self.state, device, cache_bytes)
        self.cost_names = set(names)
        self.all_terms = self.cache.terms if len(held) == len(names) else cost_terms(spec, names)
        self.dependencies = {
            name: tuple(sorted({g for term in terms for g in term.depends_on if g in perms}))
            for name, terms in self.all_terms.items()
        }
        self.owner = {g.name: placement.single_holder({m.param for m in g.members}) for g in spec.active_groups}
        self.fibres = {g.name: fibred_over(spec, g) for g in spec.active_groups}
        self.shared = {g.name: shared for g in spec.active_groups if (shared := shared_within(spec, g))}
        self.parts = {
            name: fibre_parts(spec, spec[name]) for name, fibres in self.fibres.items() if fibres or name in self.shared
        }
        self.informed = informed
        self.pending: set[str] = {g.name for g in self.groups} if informed else set()
        self.solved_at: dict[str, tuple[int, ...]] = {}
        self.value = placement.collective.all_sum(self.cache.objective())

    def sweep(self, visited: GroupCallback | None = None) -> bool:
        """Visit every group once (the first, informed sweep in the spec's order, later ones in a
        fresh random order), calling ``visited(done, total)`` after each; return whether to sweep
        again (a group improved, or the sweep was informed: its costs left terms out)."""
        order = self.generator.permutation(len(self.groups))
        informed = self.informed
        if informed:
            order = np.arange(len(self.groups))
        improved = False
        for done, index in enumerate(order, start=1):
            improved |= self.solve_group(self.groups[index])
            self.pending.discard(self.groups[index].name)
            if visited is not None:
                visited(done, len(order))
        self.informed = False
        return improved or informed

    def solve_group(self, group: PermutationGroup) -> bool:
        """Re-solve one group with the others fixed; return whether its permutation changed.

        A group is skipped when neither its cost nor its permutation has changed since its last
        solve (by another group's update, or by the head solver). Groups that others are fibred
        over are solved jointly with their fibres (:mod:`autoperm.solvers.heads`).
        """
        if group.name in self.parts:
            return self._solve_heads(group)
        if group.name not in self.all_terms:
            return False
        stamp = self._stamp(group)
        if self.solved_at.get(group.name) == stamp:
            return False
        partial = any(not self.pending.isdisjoint(term.depends_on) for term in self.all_terms[group.name])
        if partial:  # an informed first sweep: solve again once every term can enter
            self.solved_at.pop(group.name, None)
        else:
            self.solved_at[group.name] = stamp
        shape = (group.size, group.size) if group.per is None else (self.spec[group.per].size, group.size, group.size)
        local = self.cache.group_cost(group, self.pending)
        cost, source = self.placement.whole_cost(local, shape, self.owner.get(group.name))
        if cost is None:  # every term waits for groups not visited yet
            return False
        current = self.state.perms[group.name]
        new, old_value, new_value = self.placement.solve_on(source, lambda: _assign_group(cost, current, self.lap))
        if not is_improvement(new_value - old_value, old_value, self.tol) or not self._commit({group.name: new}):
            return False
        if not partial and group.name not in self.dependencies[group.name]:  # its own cost did not change
            self.solved_at[group.name] = self._stamp(group)
        return True

    def _stamp(self, group: PermutationGroup) -> tuple[int, ...]:
        """Versions of the group and of every group its cost depends on."""
        return self.state.stamp((group.name, *self.dependencies.get(group.name, ())))

    def _commit(self, new: Mapping[str, torch.Tensor]) -> bool:
        """Move to the permutations ``new``, measuring the objective's exact change.

        The LAP values that propose a move are exact for most groups but not all (a group that
        permutes two axes of one tensor makes the objective quadratic in it), so the change is
        measured on the tensors the move touches. A move that does not improve the objective by
        more than ``tol`` is taken back, except during an informed first sweep, whose partial
        costs may trade objective now for a better start. Keeps ``value`` the true objective.

        Returns:
            whether the move was kept.
        """
        changed = {name: p for name, p in new.items() if not torch.equal(p, self.state.perms[name])}
        if not changed:
            return False
        touched = self.cache.touched(changed)
        before = sum(self.cache.inner(param) for param in touched)
        saved = self.state.move(changed)
        gain = self.placement.collective.all_sum(sum(self.cache.inner(param) for param in touched) - before)
        if not self.informed and not is_improvement(gain, self.value, self.tol):
            self.state.restore(saved)
            return False
        self.value += gain
        return True

    def _solve_heads(self, group: PermutationGroup) -> bool:
        """Heads and their fibred within-head groups, one part of non-overlapping fibres at a time."""
        shared = self.shared.get(group.name, [])
        fibres = self.fibres[group.name]
        names = [group.name, *(f.name for f in fibres), *(g.name for g in shared)]
        stamp = tuple(v for name in names for v in self._stamp(self.spec[name]))
        if self.solved_at.get(group.name) == stamp:
            return False
        moved = False
        partial = False
        ready = {group.name}
        for within in shared:  # first: in an informed first sweep it has the clearest signal
            _, leave_out = self._unvisited(group, [within], ready)
            partial |= bool(leave_out)
            solved = self._solve_shared(group, within, attach_fibres(self.state.perms, group, fibres), leave_out)
            if solved is None:
                continue
            ready.add(within.name)
            new, old_value, new_value = solved
            if not is_improvement(new_value - old_value, old_value, self.tol):
                continue
            new.update(carry_fibres(self.state.perms, group, fibres, new[group.name]))
            moved |= self._commit(new)
        for part in self.parts[group.name]:
            others = [f for f in fibres if f not in part]
            attached = attach_fibres(self.state.perms, group, others)
            params, leave_out = self._unvisited(group, part, ready)
            partial |= bool(leave_out)
            new, old_value, new_value = self._solve_part(group, part, attached, leave_out)
            if len(leave_out) < len(params):
                ready.update(f.name for f in part)
            if not is_improvement(new_value - old_value, old_value, self.tol):
                continue
            new.update(carry_fibres(self.state.perms, group, others, new[group.name]))
            moved |= self._commit(new)
        if partial:  # solve again once every term can enter
            self.solved_at.pop(group.name, None)
        else:
            self.solved_at[group.name] = tuple(v for name in names for v in self._stamp(self.spec[name]))
        return moved

    def _unvisited(
        self, group: PermutationGroup, solved: Sequence[PermutationGroup], ready: set[str]
    ) -> tuple[set[str], frozenset[str]]:
        """The cost tensors of ``group`` and ``solved``, and those of them an informed first sweep
        leaves out (they touch a group not visited yet). Every cost tensor of the spec is looked
        at, not only this rank's: distributed ranks must agree."""
        unknown = self.pending - ready - {g.name for g in solved}
        params = {m.param for g in (group, *solved) for m in g.members if m.param in self.cost_names}
        leave_out = frozenset(p for p in params if unknown.intersection(g.name for g, _ in self.spec.members_by_param[p]))
        return params, leave_out

    def _solve_shared(
        self, group: PermutationGroup, within: PermutationGroup, perms: Mapping[str, torch.Tensor], leave_out: frozenset[str]
    ) -> tuple[dict[str, torch.Tensor], float, float] | None:
        """Heads and a within-head group they share (:func:`autoperm.solvers.heads.solve_shared`), on
        the rank holding their tensors; ``None`` (left to coordinate descent) when ranks share them."""
        owner = self.placement.single_holder({m.param for g in (group, within) for m in g.members})
        if owner is None:
            return None
        cache = self.cache
        return self.placement.solve_on(
            owner, lambda: solve_shared(self.spec, group, within, cache.a, cache.b, perms, leave_out, method=self.lap)
        )

    def _solve_part(
        self,
        group: PermutationGroup,
        part: Sequence[PermutationGroup],
        perms: Mapping[str, torch.Tensor],
        leave_out: frozenset[str],
    ) -> tuple[dict[str, torch.Tensor], float, float]:
        """Heads and one part of their fibres (:func:`autoperm.solvers.heads.solve_heads`), without the
        tensors in ``leave_out``, on the rank holding their tensors."""
        params = {m.param for g in (group, *part) for m in g.members}
        owner = self.placement.single_holder(params)
        if owner is None:
            ranks = sorted({self.placement.holder[p] for p in params if p in self.placement.holder})
            raise SolverError(
                f"the tensors of head group {group.name!r} and its within-head groups are spread over ranks {ranks}; "
                "keep each attention block on one rank (autoperm.solvers.distributed.shard_parameters does)"
            )
        cache = self.cache
        return self.placement.solve_on(
            owner, lambda: solve_heads(self.spec, group, part, cache.a, cache.b, perms, leave_out, method=self.lap)
        )


def _assign_group(cost: np.ndarray, current: torch.Tensor, method: LapMethod) -> tuple[torch.Tensor, float, float]:
    """The LAP of a group's cost (:func:`_assign`), one row of heads at a time for a fibred group."""
    if cost.ndim == 2:
        return _assign(cost, current, method)
    rows = [_assign(cost[k], current[k], method) for k in range(cost.shape[0])]
    return torch.stack([r[0] for r in rows]), sum(r[1] for r in rows), sum(r[2] for r in rows)


def _assign(cost: np.ndarray, current: torch.Tensor, method: LapMethod = "auto") -> tuple[torch.Tensor, float, float]:
    """Solve ``max_P sum_i cost[i, P[i]]``; return the assignment and the old and new values.

    ``cost`` is the caller's scratch array: it is negated in place and the minimum solved, which
    is the same problem without the solver's own negated copy (1 GiB at n = 11008).
    """
    index = np.arange(cost.shape[0])
    old_value = float(cost[index, current.numpy()].sum())
    negated = np.negative(cost, out=cost)
    result = linear_assignment(negated, maximize=False, method=method)
    return torch.as_tensor(result.columns, dtype=torch.long), old_value, -result.value


def _validate_groups(spec: PermutationSpec, groups: Collection[str]) -> None:
    """Raise :class:`SolverError` naming the entries of ``groups`` that are not groups of ``spec``."""
    unknown = [name for name in groups if name not in spec.group_by_name]
    if unknown:
        raise SolverError(f"unknown permutation group(s) {unknown[:5]}; the spec has {[g.name for g in spec.groups][:5]}...")
