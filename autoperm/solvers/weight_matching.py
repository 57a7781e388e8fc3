"""Weight matching by coordinate descent over permutation groups (Git Re-Basin, arXiv 2209.04836).

Maximises ``sum <W_A, pi(W_B)>_F`` over the permutations ``pi`` of a spec: visit the groups in a
fresh random order each sweep and solve one linear assignment problem per group, with every
other group held at its current permutation. Ito et al. (arXiv 2402.04051) analyse why the
result connects the two models linearly.

A member's contribution ``A_m @ B_m'^T`` to its group's cost depends only on the permutations
of the *other* groups touching the same tensor, so each contribution is cached with the version
counters of those groups and recomputed only when one of them has changed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from autoperm.errors import SolverError
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
from autoperm.solvers.result import MatchingResult, check_state_dicts, is_cost_tensor
from autoperm.spec import (
    Member,
    PermutationGroup,
    PermutationSpec,
    check_permutations,
    identity_permutation,
    layout_positions,
    member_matrix,
)
from autoperm.spec.apply import axis_index

__all__ = ["weight_matching"]

logger = logging.getLogger(__name__)

SweepCallback = Callable[[int, float], None]
"""Called after every sweep with the sweep number (from 1) and the objective."""


@dataclass(frozen=True)
class _Term:
    """One member of a group that enters the cost, and the groups its product depends on."""

    group: PermutationGroup
    member: Member
    depends_on: tuple[str, ...]


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
            more than a sixteenth of it once that is above 512 MiB (512 MiB for a
            TinyLlama-1.1B pair in float32), so that large models stay near their own size.

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
    if distributed:
        from autoperm.solvers.distributed import DistributedCoordinateDescent  # it imports this module

        solver: _CoordinateDescent = DistributedCoordinateDescent(
            spec, state_dict_a, state_dict_b, perms, torch.device(device), lap=lap, cache_bytes=cache_bytes
        )
    else:
        solver = _CoordinateDescent(spec, state_dict_a, state_dict_b, perms, torch.device(device), lap=lap, cache_bytes=cache_bytes)
    to_solve = [g for g in spec.active_groups if groups is None or g.name in groups]
    generator = np.random.default_rng(seed)
    history = [solver.value]
    converged = False
    sweep = 0
    informed = first_sweep == "graph" and init_perms is None  # a given start is not the identity
    if informed:
        solver.pending = {g.name for g in to_solve}
    for sweep in range(1, max_iter + 1):
        improved = False
        order = generator.permutation(len(to_solve))
        solver.informed = sweep == 1 and informed
        if solver.informed:
            order = np.arange(len(to_solve))
        for index in order:
            improved |= solver.solve_group(to_solve[index], tol)
            solver.pending.discard(to_solve[index].name)
        history.append(solver.value)
        if solver.informed:  # its costs left terms out: always sweep again with every term
            improved = True
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
    return MatchingResult(perms=solver.perms, objective=history[-1], n_iter=sweep, converged=converged, history=history)


class _CoordinateDescent:
    """The state of one weight-matching run: current permutations and cached cost products.

    Memory: besides the two state dicts (shared, not copied on the CPU), the run holds one
    float64 ``n x n`` product per cost term whose permutation dependencies can change, one
    constant ``n x n`` sum per group, and temporary copies of one tensor (or, for tensors above
    ``_CHUNK_ELEMENTS``, of one slice) at a time.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_dict_a: Mapping[str, torch.Tensor],
        state_dict_b: Mapping[str, torch.Tensor],
        perms: dict[str, torch.Tensor],
        device: torch.device,
        lap: LapMethod = "auto",
        cache_bytes: int | None = None,
        cost_params: Sequence[str] | None = None,
    ):
        """``cost_params``: every cost tensor's name, when the state dicts hold only some (one rank's
        shard): the costs use the tensors held, the bookkeeping follows all of them."""
        self.spec = spec
        self.perms = perms
        self.device = device
        self.lap: LapMethod = lap
        names = list(cost_params) if cost_params is not None else [
            name for name in spec.members_by_param if is_cost_tensor(name, state_dict_a[name])
        ]
        self.cost_names = set(names)  # every cost tensor's name, also those of other ranks
        self.cost_params = [name for name in names if name in state_dict_a]
        self.a = {name: state_dict_a[name].detach().to(device) for name in self.cost_params}
        self.b = {name: state_dict_b[name].detach().to(device) for name in self.cost_params}
        self.versions = {name: 0 for name in perms}
        self.version_ids = itertools.count(1)  # every change gets a fresh id, so a reverted id is never reused
        self.terms = _terms(spec, self.cost_params)
        self.all_terms = self.terms if len(self.cost_params) == len(names) else _terms(spec, names)
        self.dependencies = {
            name: tuple(sorted({g for term in terms for g in term.depends_on if g in self.versions}))
            for name, terms in self.all_terms.items()
        }
        self.products: dict[tuple[str, int], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
        # Cached n x n products may not outgrow the cost tensors themselves (models with wide
        # groups and few weights, such as MobileNetV2): past this budget products are recomputed.
        self.pending: set[str] = set()  # groups not visited yet in an informed first sweep
        weights = sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))
        self.cache_budget = default_cache_bytes(weights) if cache_bytes is None else cache_bytes
        self.cache_bytes = 0
        self.constants: dict[str, torch.Tensor | None] = {}
        self.solved_at: dict[str, tuple[int, ...]] = {}
        self.inner_products: dict[str, tuple[tuple[int, ...], float]] = {}
        self.params_of: dict[str, tuple[str, ...]] = {}
        for name in self.cost_params:
            for group, _ in spec.members_by_param[name]:
                if name not in self.params_of.setdefault(group.name, ()):
                    self.params_of[group.name] += (name,)
        self.fibres = {g.name: fibred_over(spec, g) for g in spec.active_groups}
        self.shared = {g.name: shared for g in spec.active_groups if (shared := shared_within(spec, g))}
        self.parts = {
            name: fibre_parts(spec, spec[name]) for name, fibres in self.fibres.items() if fibres or name in self.shared
        }
        self.informed = False  # an informed first sweep: moves are taken on partial costs
        self.value = self.objective()

    # ------------------------------------------------------------------ objective
    def objective(self) -> float:
        """``sum <A, pi(B)>`` over the cost tensors, recomputing only tensors whose perms changed."""
        return self._total(sum(self._inner(name) for name in self.cost_params))

    def _total(self, value: float) -> float:
        """A sum over the cost tensors held here is the whole sum (distributed runs add the ranks')."""
        return value

    def _inner(self, name: str) -> float:
        """``<A, pi(B)>`` of one cost tensor, cached by the versions of the groups touching it."""
        key = tuple(self.versions.get(g.name, 0) for g, _ in self.spec.members_by_param[name])
        cached = self.inner_products.get(name)
        if cached is None or cached[0] != key:
            cached = (key, _inner_product(self.a[name], self.b[name], self._indices(name)))
            self.inner_products[name] = cached
        return cached[1]

    def _commit(self, new: Mapping[str, torch.Tensor], tol: float) -> bool:
        """Move to the permutations ``new``, measuring the objective's exact change.

        The LAP values that propose a move are exact for most groups but not all (a group that
        permutes two axes of one tensor makes the objective quadratic in it), so the change is
        measured on the tensors the move touches. A move that does not improve the objective by
        more than ``tol`` is taken back, except during an informed first sweep, whose partial
        costs may trade objective now for a better start. Keeps ``value`` the true objective.

        Returns:
            whether the move was kept.
        """
        changed = {name: p for name, p in new.items() if not torch.equal(p, self.perms[name])}
        if not changed:
            return False
        touched = {param for name in changed for param in self.params_of.get(name, ())}
        before = sum(self._inner(param) for param in touched)
        saved = {name: (self.perms[name], self.versions[name]) for name in changed}
        for name, permutation in changed.items():
            self.perms[name] = permutation
            self.versions[name] = next(self.version_ids)
        gain = self._total(sum(self._inner(param) for param in touched) - before)
        if not self.informed and gain <= tol * max(1.0, abs(self.value)):
            for name, (permutation, version) in saved.items():
                self.perms[name], self.versions[name] = permutation, version
            return False
        self.value += gain
        return True

    # ---------------------------------------------------------------------- solve
    def solve_group(self, group: PermutationGroup, tol: float) -> bool:
        """Re-solve one group with the others fixed; return whether its permutation changed.

        A group is skipped when neither its cost nor its permutation has changed since its last
        solve (by another group's update, or by the head solver): the LAP would return the
        current permutation again. Groups that others are fibred over are solved jointly with
        their fibres (:mod:`autoperm.solvers.heads`).
        """
        if group.name in self.parts:
            return self._solve_heads(group, tol)
        if group.name not in self.all_terms:
            return False
        stamp = self._stamp(group)
        if self.solved_at.get(group.name) == stamp:
            return False
        self.solved_at[group.name] = stamp
        cost = self._cost(group)
        if cost is None:  # every term waits for groups not visited yet
            return False
        current = self.perms[group.name]
        if group.per is None:
            new, old_value, new_value = self._assignment(cost, current)
        else:
            rows = [self._assignment(cost[k], current[k]) for k in range(cost.shape[0])]
            new = torch.stack([r[0] for r in rows])
            old_value, new_value = sum(r[1] for r in rows), sum(r[2] for r in rows)
        if new_value - old_value <= tol * max(1.0, abs(old_value)) or not self._commit({group.name: new}, tol):
            return False
        complete = group.name in self.solved_at  # _cost drops the stamp of a partial cost
        if complete and group.name not in self.dependencies[group.name]:  # its own cost did not change
            self.solved_at[group.name] = self._stamp(group)
        return True

    def _stamp(self, group: PermutationGroup) -> tuple[int, ...]:
        """Versions of the group and of every group its cost depends on."""
        return (self.versions[group.name], *(self.versions[g] for g in self.dependencies.get(group.name, ())))

    def _solve_heads(self, group: PermutationGroup, tol: float) -> bool:
        """Heads and their fibred within-head groups, one part of non-overlapping fibres at a time."""
        shared = self.shared.get(group.name, [])
        names = [group.name, *(f.name for f in self.fibres[group.name]), *(g.name for g in shared)]
        stamp = tuple(v for name in names for v in self._stamp(self.spec[name]))
        if self.solved_at.get(group.name) == stamp:
            return False
        moved = False
        partial = False
        ready = {group.name}
        for within in shared:  # first: in an informed first sweep it has the clearest signal
            _, leave_out = self._unvisited(group, [within], ready)
            partial |= bool(leave_out)
            fibres = self.fibres[group.name]
            solved = self._solve_shared(group, within, attach_fibres(self.perms, group, fibres), leave_out)
            if solved is None:
                continue
            ready.add(within.name)
            new, old_value, new_value = solved
            if new_value - old_value <= tol * max(1.0, abs(old_value)):
                continue
            new.update(carry_fibres(self.perms, group, fibres, new[group.name]))
            moved |= self._commit(new, tol)
        for part in self.parts[group.name]:
            others = [f for f in self.fibres[group.name] if f not in part]
            attached = attach_fibres(self.perms, group, others)
            params, leave_out = self._unvisited(group, part, ready)
            partial |= bool(leave_out)
            new, old_value, new_value = self._solve_part(group, part, attached, leave_out)
            if len(leave_out) < len(params):
                ready.update(f.name for f in part)
            if new_value - old_value <= tol * max(1.0, abs(old_value)):
                continue
            new.update(carry_fibres(self.perms, group, others, new[group.name]))
            moved |= self._commit(new, tol)
        if partial:  # solve again once every term can enter
            self.solved_at.pop(group.name, None)
        else:
            self.solved_at[group.name] = tuple(v for name in names for v in self._stamp(self.spec[name]))
        return moved

    def _assignment(self, cost: np.ndarray, current: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """The LAP of one cost (see :func:`_assign`)."""
        return _assign(cost, current, self.lap)

    def _unvisited(
        self, group: PermutationGroup, solved: Sequence[PermutationGroup], ready: set[str]
    ) -> tuple[set[str], frozenset[str]]:
        """The cost tensors of ``group`` and ``solved``, and those of them an informed first sweep
        leaves out (they touch a group not visited yet, as in :meth:`_cost`). Every cost tensor of
        the spec is looked at, not only this rank's: distributed ranks must agree."""
        unknown = self.pending - ready - {g.name for g in solved}
        params = {m.param for g in (group, *solved) for m in g.members if m.param in self.cost_names}
        leave_out = frozenset(p for p in params if unknown.intersection(g.name for g, _ in self.spec.members_by_param[p]))
        return params, leave_out

    def _solve_shared(
        self,
        group: PermutationGroup,
        within: PermutationGroup,
        perms: Mapping[str, torch.Tensor],
        leave_out: frozenset[str] = frozenset(),
    ) -> tuple[dict[str, torch.Tensor], float, float] | None:
        """Heads and a within-head group they share (:func:`autoperm.solvers.heads.solve_shared`)."""
        return solve_shared(self.spec, group, within, self.a, self.b, perms, leave_out)

    def _solve_part(
        self,
        group: PermutationGroup,
        part: Sequence[PermutationGroup],
        perms: Mapping[str, torch.Tensor],
        leave_out: frozenset[str] = frozenset(),
    ) -> tuple[dict[str, torch.Tensor], float, float]:
        """Heads and one part of their fibres (:func:`autoperm.solvers.heads.solve_heads`), without
        the tensors in ``leave_out``."""
        return solve_heads(self.spec, group, part, self.a, self.b, perms, leave_out)

    def _cost(self, group: PermutationGroup) -> np.ndarray | None:
        """``sum_m A_m @ B_m'^T`` as a float64 array (``(per, n, n)`` for a fibred group)."""
        fibred = group.per is not None
        terms = self.terms.get(group.name, [])
        waiting = {i for i, t in enumerate(terms) if self.pending.intersection(t.depends_on)}
        if any(self.pending.intersection(t.depends_on) for t in self.all_terms[group.name]):
            self.solved_at.pop(group.name, None)  # an informed first sweep: solve again once every term can enter
        if group.name in self.constants:
            constant = self.constants[group.name]
            total = None if constant is None else constant.clone()
        else:
            total = None
            for term in terms:
                if not term.depends_on:
                    product = self._product(term, fibred, total is None)
                    total = product if total is None else total.add_(product)
            size = 0 if total is None else total.numel() * total.element_size()
            if self.cache_bytes + size <= self.cache_budget:
                self.constants[group.name] = None if total is None else total.clone()
                self.cache_bytes += size
        for index, term in enumerate(terms):
            if not term.depends_on or index in waiting:
                continue
            key = (group.name, index)
            cached = self.products.get(key)
            size = 8 * group.size ** 2 * (self.spec[group.per].size if fibred else 1) if cached is None else 0
            if cached is None and self.cache_bytes + size > self.cache_budget:
                # not cached: added to the float64 total in the tensors' dtype, without a float64 copy
                product = self._product(term, fibred, total is None)
                total = product if total is None else total.add_(product)
                continue
            product = self._product(term, fibred) if cached is None else self._refresh(term, *cached)
            self.cache_bytes += size
            self.products[key] = ({g: self.perms[g] for g in term.depends_on}, product)
            total = product.clone() if total is None else total.add_(product)
        return None if total is None else total.cpu().numpy()

    def _refresh(self, term: _Term, seen: dict[str, torch.Tensor], product: torch.Tensor) -> torch.Tensor:
        """Bring a cached product up to date with the permutations that changed since it was made.

        One changed plain group on one other axis, moving a few indices, is a low-rank update:
        only the positions it moved enter ``A_m @ (B_m'_new - B_m'_old)^T``. Anything else is
        recomputed from scratch.
        """
        changed = [g for g in term.depends_on if self.perms[g] is not seen[g]]
        if not changed:
            return product
        name, member, group = term.member.param, term.member, term.group
        pairs = self.spec.members_by_param[name]
        moved = changed[0]
        moved_members = [m for g, m in pairs if g.name == moved]
        own_members = [m for g, m in pairs if g.name == group.name]
        old, new = seen[moved], self.perms[moved]
        indices = torch.nonzero(old != new).flatten() if old.dim() == 1 else None
        if (
            len(changed) > 1
            or group.per is not None
            or indices is None
            or len(moved_members) != 1
            or len(own_members) != 1
            or 4 * indices.numel() > old.numel()
        ):
            return self._product(term, group.per is not None)
        other = moved_members[0]
        positions = layout_positions(other, self.spec[moved].size)
        targets = positions.index_select(-2, indices).flatten().to(self.device)
        gather = self._indices(name, group, member, also_skip=moved)
        base = gather.pop(other.axis, None)
        sources_new = positions.index_select(-2, new[indices]).flatten().to(self.device)
        sources_old = positions.index_select(-2, old[indices]).flatten().to(self.device)
        if base is not None:
            sources_new, sources_old = base[sources_new], base[sources_old]
        b = self.b[name]
        difference = _gather(b.index_select(other.axis, sources_new), gather)
        difference.sub_(_gather(b.index_select(other.axis, sources_old), gather))
        a_part = member_matrix(self.a[name].index_select(other.axis, targets), member, group.size)
        return product.add_((a_part @ member_matrix(difference, member, group.size).T).double())

    def _product(self, term: _Term, fibred: bool, double: bool = True) -> torch.Tensor:
        """``A_m @ B_m'^T`` from scratch, in float64 (``double=False``: in the tensors' dtype, to be
        added to a float64 sum without a float64 copy)."""
        name, member, size = term.member.param, term.member, term.group.size
        a, b = self.a[name], self.b[name]
        indices = self._indices(name, term.group, member)
        split = _chunks(a, member.axis)
        views = not indices and not fibred and member.is_plain and a.shape[member.axis] == size
        if split is not None and not (views and (member.axis == 0 or a.dim() == 2)):
            product = _split_product(a, b, indices, member, size, fibred, *split)
        else:
            a_matrix = member_matrix(a, member, size, fibred)
            product = a_matrix @ _gathered_matrix(b, indices, member, size, fibred).mT
        return product.double() if double else product

    def _indices(
        self,
        name: str,
        group: PermutationGroup | None = None,
        member: Member | None = None,
        also_skip: str | None = None,
    ) -> dict[int, torch.Tensor]:
        """Per axis of B's entry ``name``, the source positions that permuting it gathers.

        Every current permutation applies except ``group``'s and ``also_skip``'s; the other
        members of a plain ``group`` in the same tensor still move, only ``member`` is left for
        the LAP. Identity axes are left out, so an empty dict means "B as it is".
        """
        shape = self.b[name].shape
        pairs = self.spec.members_by_param[name]
        by_axis: dict[int, list[tuple[PermutationGroup, Member]]] = {}
        for g, m in pairs:
            if g.name in self.perms and (group is None or g.name != group.name) and g.name != also_skip:
                by_axis.setdefault(m.axis, []).append((g, m))
        indices = {axis: axis_index(self.spec, found, self.perms, shape[axis]) for axis, found in by_axis.items()}
        if group is not None and group.per is None:
            for g, other in pairs:
                if g.name != group.name or other is member:
                    continue
                positions = layout_positions(other, group.size)
                index = torch.arange(shape[other.axis])
                index[positions.flatten()] = positions.index_select(-2, self.perms[group.name]).flatten()
                base = indices.get(other.axis)
                indices[other.axis] = index if base is None else base[index]
        return {
            axis: index.to(self.device)
            for axis, index in indices.items()
            if index is not None and not torch.equal(index, torch.arange(index.numel()))
        }


_CACHE_FLOOR = 512 << 20
"""The default product cache is the pair's size up to this, and a sixteenth of it beyond."""


def default_cache_bytes(weights: int) -> int:
    """The default budget for cached cost products, given the bytes of the two models' cost tensors.

    Small models cache every product (they are revisited often, and cheap to keep); large ones
    keep a sixteenth of their size, so a 1.1B-parameter pair's peak memory stays within 1.3x its
    weights (``benchmarks/README.md``): at that size products are rarely reused (a sweep after
    the first re-solves only the groups whose neighbours moved, and recomputes their products).
    """
    return min(weights, max(_CACHE_FLOOR, weights // 16))


_CHUNK_ELEMENTS = 1 << 22
"""Most elements of a tensor gathered at once (16 MiB in float32): bounds the temporary memory."""


def _chunks(tensor: torch.Tensor, keep_axis: int | None) -> tuple[int, int] | None:
    """An axis other than ``keep_axis`` to slice ``tensor`` along, and the slice length; ``None`` if small."""
    axes = [axis for axis in range(tensor.dim()) if axis != keep_axis]
    if tensor.numel() <= _CHUNK_ELEMENTS or not axes:
        return None
    axis = max(axes, key=lambda a: tensor.shape[a])
    return axis, max(1, _CHUNK_ELEMENTS * tensor.shape[axis] // tensor.numel())


def _gather(
    tensor: torch.Tensor, indices: Mapping[int, torch.Tensor], axis: int | None = None, start: int = 0, length: int = 0
) -> torch.Tensor:
    """``tensor`` permuted by ``indices`` (axis -> source positions), only ``[start, start + length)`` along ``axis``."""
    if axis is not None:
        index = indices.get(axis)
        tensor = tensor.narrow(axis, start, length) if index is None else tensor.index_select(axis, index[start:start + length])
    for other, index in indices.items():
        if other != axis:
            tensor = tensor.index_select(other, index)
    return tensor


def _gathered_matrix(
    tensor: torch.Tensor,
    indices: Mapping[int, torch.Tensor],
    member: Member,
    size: int,
    fibred: bool,
    axis: int | None = None,
    start: int = 0,
    length: int = 0,
) -> torch.Tensor:
    """``member_matrix(_gather(tensor, indices, axis, start, length))``, gathered with the member axis
    first so that the gather is the only copy."""
    if axis is not None:
        index = indices.get(axis)
        tensor = tensor.narrow(axis, start, length) if index is None else tensor.index_select(axis, index[start:start + length])
    moved = tensor.movedim(member.axis, 0)
    for other, index in indices.items():
        if other != axis:
            moved = moved.index_select(0 if other == member.axis else other + (other < member.axis), index)
    return member_matrix(moved, member.model_copy(update={"axis": 0}), size, fibred)


def _split_product(
    a: torch.Tensor,
    b: torch.Tensor,
    indices: Mapping[int, torch.Tensor],
    member: Member,
    size: int,
    fibred: bool,
    axis: int,
    step: int,
) -> torch.Tensor:
    """``M(A) @ M(B')^T`` in the tensors' dtype, summing slices of ``step`` along ``axis`` (not the member's).

    ``M`` is the member matrix and ``B'`` = ``b`` gathered by ``indices``. The slices accumulate in
    the tensors' dtype, as one matmul would, and no slice holds more than ``_CHUNK_ELEMENTS``.
    """
    total: torch.Tensor | None = None
    for start in range(0, a.shape[axis], step):
        length = min(step, a.shape[axis] - start)
        a_part = member_matrix(a.narrow(axis, start, length), member, size, fibred)
        b_part = _gathered_matrix(b, indices, member, size, fibred, axis, start, length)
        if total is None:
            total = a_part @ b_part.mT
        elif fibred:
            total.baddbmm_(a_part, b_part.mT)
        else:
            total.addmm_(a_part, b_part.mT)
    assert total is not None
    return total


def _inner_product(a: torch.Tensor, b: torch.Tensor, indices: Mapping[int, torch.Tensor]) -> float:
    """``<A, B'>`` in float64, ``B'`` = ``b`` gathered by ``indices``, a slice at a time."""
    split = _chunks(a, None)
    if split is None:
        return float(torch.sum(a.double() * _gather(b, indices).double()))
    axis, step = split
    total = 0.0
    for start in range(0, a.shape[axis], step):
        length = min(step, a.shape[axis] - start)
        part = _gather(b, indices, axis, start, length).to(torch.float64, copy=True)
        total += float(torch.sum(part.mul_(a.narrow(axis, start, length))))
    return total


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


def _terms(spec: PermutationSpec, cost_params: Sequence[str]) -> dict[str, list[_Term]]:
    """Per group, the members of ``cost_params`` that enter its cost and the groups each depends on."""
    terms: dict[str, list[_Term]] = {}
    for name in cost_params:
        pairs = spec.members_by_param[name]
        for group, member in pairs:
            others = {
                g.name for g, m in pairs
                if m is not member and (m.axis != member.axis or g is group or group.name in (g.per, g.name) or g.name == group.per)
            }
            terms.setdefault(group.name, []).append(_Term(group, member, tuple(sorted(others))))
    return terms


def _validate_groups(spec: PermutationSpec, groups: Collection[str]) -> None:
    unknown = [name for name in groups if name not in spec.group_by_name]
    if unknown:
        raise SolverError(f"unknown permutation group(s) {unknown[:5]}; the spec has {[g.name for g in spec.groups][:5]}...")
