"""Generalised weight matching: permutations, orthogonal maps and head maps in one coordinate descent.

Maximises ``sum <W_A, T(W_B)>_F`` over a transform of each group of the kind it is solved in:
a permutation (linear assignment) or an orthogonal map (orthogonal Procrustes: the polar factor
``U V^T`` of the cost ``C = U S V^T``; Schoenemann 1966). Orthogonal maps keep every norm, so this
is ``min ||W_A - T(W_B)||_F``, the objective of Theus et al. ("Generalized Linear Mode
Connectivity for Transformers", arXiv 2506.22712) for their orthogonal classes. Groups that
must fix the all-ones vector (LayerNorm streams, ``fixes_ones``) solve Procrustes on its
orthogonal complement.

Heads are assigned jointly with their within-head maps: B's head ``c`` scores against A's head
``a`` by the best within-head map, ``||C_ac||_*`` (the nuclear norm, Procrustes' optimum) for an
orthogonal fibre and the assignment value for a permutation fibre; one linear assignment over
heads, then each head's maps.

The run starts from permutation weight matching (:func:`autoperm.solvers.weight_matching`) and
works in the current coordinates: each visit computes ``D = A . B'^T`` along the group's positions
for the current transformed ``B'`` and moves by the best group element ``Delta``; the transform of
the group becomes ``Delta T``. Every move is measured on the tensors it touches and kept only if
the objective improves, so ``objective`` is exact.

Two things keep a sweep near the cost of its products. A tensor that only one group moves (an
embedding table or an output layer, whose vocabulary axis is fixed; a bias) is never moved during
the run: its contribution is ``<K, M>`` for the float64 product ``K = A . B'^T`` taken once and
the group's map ``M`` since the start, and its share of the group's cost is ``K M^T``. And each
tensor's inner product ``<A, B'>`` is kept, so a move measures only the tensors it changes, once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from autoperm.errors import SolverError
from autoperm.solvers.lap import linear_assignment
from autoperm.solvers.result import check_state_dicts, is_cost_tensor, is_improvement
from autoperm.solvers.weight_matching import weight_matching
from autoperm.spec import Member, PermutationGroup, PermutationSpec, check_permutations, identity_permutation
from autoperm.spec.apply import apply_permutation, layout_positions, member_matrix

__all__ = ["SYMMETRIES", "Symmetries", "GeneralizedResult", "assignment_value", "best_assignment", "generalized_matching",
           "procrustes", "solved_kind"]

logger = logging.getLogger(__name__)

Symmetries = Literal["permutation", "orthogonal", "full"]
SYMMETRIES: tuple[str, ...] = ("permutation", "orthogonal", "full")
"""How much of each group's kind the solvers use: permutations only; orthogonal maps where a
group admits them; every kind (invertible groups are balanced first, see :mod:`autoperm.solvers.gauge`)."""

SweepCallback = Callable[[int, float], None]


@dataclass
class GeneralizedResult:
    """What :func:`generalized_matching` found.

    Attributes:
        transforms: ``{group name: transform}``: a LongTensor permutation or a float64 matrix
            (stacked per head for fibred groups); apply with :func:`autoperm.apply_transform`.
        objective: ``sum <W_A, T(W_B)>_F`` over the cost tensors at ``transforms``.
        start_objective: the same at the permutation weight-matching start.
        n_iter: sweeps run after the start.
        converged: whether a sweep improved nothing before ``max_iter``.
        history: the objective at the start and after every sweep.
        kinds: the kind each group was solved in (``"permutation"`` or ``"orthogonal"``).
    """

    transforms: dict[str, torch.Tensor]
    objective: float
    start_objective: float
    n_iter: int
    converged: bool
    history: list[float] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)


def solved_kind(group: PermutationGroup, symmetries: str) -> str:
    """The kind ``group`` is solved in under ``symmetries``: ``"orthogonal"`` when it admits orthogonal
    maps (kinds ``orthogonal`` and ``invertible``) and ``symmetries`` is not ``"permutation"``, else
    ``"permutation"`` (scale groups are balanced by the gauge, then permuted)."""
    if symmetries not in SYMMETRIES:
        raise SolverError(f"unknown symmetries {symmetries!r}; choose from {list(SYMMETRIES)}")
    if symmetries != "permutation" and group.kind in ("orthogonal", "invertible"):
        return "orthogonal"
    return "permutation"


def procrustes(cost: torch.Tensor, fixes_ones: bool = False) -> torch.Tensor:
    """The orthogonal ``Q`` maximising ``sum_ij Q[i, j] cost[i, j]``: the polar factor of ``cost``.

    With ``fixes_ones`` the maximum over the orthogonal maps with ``Q 1 = 1``: Procrustes on the
    complement of the all-ones vector, in the basis of the Householder reflection that maps
    ``e_1`` onto ``1 / sqrt(n)``. Works on a stack of matrices too (not with ``fixes_ones``).
    """
    cost = cost.to(torch.float64)
    if not fixes_ones:
        u, _, vh = torch.linalg.svd(cost)
        return u @ vh
    size = cost.shape[-1]
    basis = _ones_basis(size)
    inside = basis.T @ cost @ basis
    rotation = torch.eye(size, dtype=torch.float64)
    if size > 1:
        u, _, vh = torch.linalg.svd(inside[1:, 1:])
        rotation[1:, 1:] = u @ vh
    return basis @ rotation @ basis.T


def _ones_basis(size: int) -> torch.Tensor:
    """A symmetric orthogonal matrix whose first column is ``1 / sqrt(size)`` (a Householder reflection)."""
    direction = -torch.full((size,), 1.0 / math.sqrt(size), dtype=torch.float64)
    direction[0] += 1.0
    norm = direction.norm()
    if norm < 1e-12:  # size 1: e_1 is the ones vector
        return torch.eye(size, dtype=torch.float64)
    direction = direction / norm
    return torch.eye(size, dtype=torch.float64) - 2 * torch.outer(direction, direction)


def generalized_matching(
    spec: PermutationSpec,
    state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor],
    symmetries: Symmetries = "orthogonal",
    max_iter: int = 50,
    seed: int = 0,
    init_perms: Mapping[str, torch.Tensor] | None = None,
    tol: float | None = None,
    callback: SweepCallback | None = None,
    device: str | torch.device = "cpu",
    sweep_tol: float = 0.0,
) -> GeneralizedResult:
    """Align B to A with a transform of each group's kind (see the module docstring).

    Args:
        spec: the spec; each group's ``kind`` (and ``fixes_ones``) bounds its transform. Give a
            canonical spec (:func:`autoperm.canonicalize`) so that norm-limited streams admit
            orthogonal maps.
        state_dict_a: the reference model's state dict (not modified).
        state_dict_b: the state dict to align (not modified).
        symmetries: ``"permutation"`` (weight matching alone), ``"orthogonal"`` or ``"full"``
            (both solve every group that admits orthogonal maps with orthogonal maps here; the
            invertible gauge of ``"full"`` is applied by :func:`autoperm.solvers.gauge.align`).
        max_iter: the most sweeps after the start.
        seed: seeds the group order of every sweep and the starting weight matching.
        init_perms: the starting permutations (default: :func:`weight_matching` of A and B).
        tol: relative improvement below which a move or sweep counts as no progress (default
            1e-14 for float64 models, 1e-10 otherwise). Near the optimum the objective is
            quadratic in the error of the maps, so the maps are found to about ``sqrt(tol)``.
        callback: called after every sweep with ``(sweep, objective)``.
        device: where the products run.
        sweep_tol: also stop after a sweep that improves the objective by less than this,
            relatively (0: sweep until no move gains more than ``tol``). A sweep costs about as
            much as a whole permutation weight matching on LLaMA shapes, and after the first
            few the gains are small (see ``benchmarks/bench_generalized.py``).

    Returns:
        A :class:`GeneralizedResult`.

    Raises:
        SolverError: the state dicts do not fit the spec, or ``symmetries`` is unknown.

    Complexity:
        Per sweep, one product ``O(n^2 k)`` per member plus one SVD or LAP ``O(n^3)`` per group;
        heads add ``H^2`` within-head products and SVDs.

    Example:
        >>> spec_c, a_c = autoperm.canonicalize(spec, model_a.state_dict())
        >>> _, b_c = autoperm.canonicalize(spec, model_b.state_dict())
        >>> result = generalized_matching(spec_c, a_c, b_c)
        >>> aligned = autoperm.apply_transform(spec_c, result.transforms, b_c)
    """
    check_state_dicts(spec, [state_dict_a, state_dict_b])
    kinds = {g.name: solved_kind(g, symmetries) for g in spec.active_groups}
    if init_perms is None:
        init_perms = weight_matching(spec, state_dict_a, state_dict_b, seed=seed, device=device).perms
    else:
        check_permutations(spec, init_perms)
    if tol is None:
        tol = 1e-14 if any(t.dtype == torch.float64 for t in state_dict_a.values()) else 1e-10
    descent = _Descent(spec, state_dict_a, state_dict_b, dict(init_perms), kinds, torch.device(device), tol)
    history = [descent.value]
    if symmetries == "permutation":
        return GeneralizedResult(descent.result(), descent.value, descent.value, 0, True, history, kinds)
    generator = np.random.default_rng(seed)
    converged = False
    sweep = 0
    for sweep in range(1, max_iter + 1):
        improved = False
        for index in generator.permutation(len(descent.units)):
            improved |= descent.solve(descent.units[index])
        history.append(descent.value)
        if callback is not None:
            callback(sweep, descent.value)
        if not improved or history[-1] - history[-2] <= sweep_tol * max(1.0, abs(history[-2])):
            converged = True
            break
    logger.info("generalised matching: objective %.6g -> %.6g in %d sweep(s)", history[0], history[-1], sweep)
    return GeneralizedResult(descent.result(), descent.value, history[0], sweep, converged, history, kinds)


@dataclass
class _Unit:
    """What one visit solves: a group alone, or a head group with its fibred within-head groups."""

    group: PermutationGroup
    fibres: tuple[PermutationGroup, ...] = ()
    heads_fixed: bool = False  # the group fibres hang on does not move (fixed, or one head)


class _Descent:
    """The state of one run: B's tensors in the current coordinates, and the transform of each group."""

    def __init__(
        self,
        spec: PermutationSpec,
        state_dict_a: Mapping[str, torch.Tensor],
        state_dict_b: Mapping[str, torch.Tensor],
        perms: dict[str, torch.Tensor],
        kinds: Mapping[str, str],
        device: torch.device,
        tol: float,
    ):
        self.spec = spec
        self.kinds = dict(kinds)
        self.tol = tol
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in state_dict_a.values()) else torch.float32
        aligned = apply_permutation(spec, perms, state_dict_b)
        names = [p for p in spec.members_by_param if is_cost_tensor(p, state_dict_a[p])]
        identity = identity_permutation(spec)
        self.transforms: dict[str, torch.Tensor] = {
            g.name: perms.get(g.name, identity[g.name]).to(torch.long).cpu() for g in spec.active_groups
        }
        self.units = self._units()
        static = self._static_params(names)
        # K_g = sum A . B'^T over the tensors only group g moves, and M_g, g's map since the start
        self.static: dict[str, torch.Tensor] = {}
        self.since_start: dict[str, torch.Tensor] = {}
        for param, (group, member) in static.items():
            product = _product(state_dict_a[param].to(device=device, dtype=torch.float64),
                               aligned[param].to(device=device, dtype=torch.float64), member, group.size)
            self.static[group.name] = self.static.get(group.name, 0) + product
            self.since_start[group.name] = torch.eye(group.size, dtype=torch.float64)
        dynamic = [p for p in names if p not in static]
        self.a = {p: state_dict_a[p].to(device=device, dtype=dtype) for p in dynamic}
        self.b = {p: aligned[p].to(device=device, dtype=dtype) for p in dynamic}
        self.inners = {p: self._inner(p) for p in dynamic}
        self.value = sum(self.inners.values()) + sum(float(torch.trace(k)) for k in self.static.values())
        self.version = {g.name: 0 for g in spec.groups}
        self.solved_at: dict[str, tuple[int, ...]] = {}
        self.neighbours = {unit.group.name: self._neighbours(unit) for unit in self.units}

    def _neighbours(self, unit: _Unit) -> tuple[str, ...]:
        """The groups whose transforms a unit's cost depends on: every group on a tensor it touches."""
        params = {m.param for g in (unit.group, *unit.fibres) for m in g.members}
        return tuple(sorted({g.name for p in params for g, _ in self.spec.members_by_param.get(p, ()) if g.name in self.version}))

    def _static_params(self, names: Sequence[str]) -> dict[str, tuple[PermutationGroup, Member]]:
        """The cost tensors that one member of one plain unit's group alone moves: ``{param: (group, member)}``.

        Every other group on such a tensor is fixed, so ``A . B'^T`` along that member changes
        only by the group's own map (see the module docstring)."""
        plain = {unit.group.name for unit in self.units if not unit.fibres}
        static: dict[str, tuple[PermutationGroup, Member]] = {}
        for param in names:
            moving = [(g, m) for g, m in self.spec.members_by_param[param] if g.active]
            if len(moving) == 1 and moving[0][0].name in plain and moving[0][1].per_axis is None:
                static[param] = moving[0]
        return static

    def _units(self) -> list[_Unit]:
        """Every active group not fibred, with its fibres when it has some that its members carry."""
        fibres: dict[str, list[PermutationGroup]] = {}
        for group in self.spec.active_groups:
            if group.per is not None:
                fibres.setdefault(group.per, []).append(group)
        along_units = {f.name for own in fibres.values() for f in own if any(m.per_axis is not None for m in f.members)}
        for name in sorted(along_units):
            logger.info("group %r: permuted per unit of another axis (per_axis), which this solver does not move; "
                        "kept at the start (weight matching's permutations), with the group it is fibred over", name)
        units = [_Unit(self.spec[name], tuple(own), heads_fixed=True)
                 for name, own in fibres.items()
                 if not self.spec[name].active and along_units.isdisjoint(f.name for f in own)]  # within-head maps of fixed heads
        for group in self.spec.active_groups:
            if group.per is not None:
                continue
            own = tuple(fibres.get(group.name, ()))
            carried = {(m.param, m.axis) for m in group.members}
            if not along_units.isdisjoint(f.name for f in own):
                continue
            if any((m.param, m.axis) not in carried for f in own for m in f.members):
                logger.info("group %r: a within-head member lies outside the heads' own tensors; kept at the start", group.name)
                continue
            units.append(_Unit(group, own))
        return units

    def result(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.transforms.items()}

    def _inner(self, param: str) -> float:
        """``<A, B'>`` of one tensor, accumulated in float64 (moves are judged on its changes)."""
        return float(torch.dot(self.a[param].flatten().to(torch.float64), self.b[param].flatten().to(torch.float64)))

    # ------------------------------------------------------------------ one visit
    def solve(self, unit: _Unit) -> bool:
        """Re-solve one unit with everything else fixed; return whether the objective improved.

        A unit is skipped while no group on its tensors has moved since it was last solved (its
        cost, hence its answer, is the same)."""
        group = unit.group
        members = [m for m in group.members if m.param in self.a]
        if not members and group.name not in self.static:
            return False
        stamp = tuple(self.version[name] for name in self.neighbours[group.name])
        if self.solved_at.get(group.name) == stamp:
            return False
        moved = self._solve_heads(unit) if unit.fibres else self._solve_group(group, members)
        if moved:
            for name in (group.name, *(f.name for f in unit.fibres)):
                self.version[name] += 1
        self.solved_at[group.name] = tuple(self.version[name] for name in self.neighbours[group.name])
        return moved

    def _solve_group(self, group: PermutationGroup, members: list[Member]) -> bool:
        cost = sum(_product(self.a[m.param], self.b[m.param], m, group.size) for m in members)
        static = self.static.get(group.name)
        if static is not None:
            cost = cost + static @ self.since_start[group.name].T
        if self.kinds[group.name] == "orthogonal":
            delta = procrustes(cost, group.fixes_ones)
            if torch.allclose(delta, torch.eye(group.size, dtype=delta.dtype), atol=1e-12):
                return False
            move = _Move(matrix=delta)
        else:
            order = best_assignment(cost)
            if torch.equal(order, torch.arange(group.size)):
                return False
            move = _Move(index=order)
        moves = [(m, move) for m in members]
        if static is None:
            return self._commit(moves, lambda: self._update(group, move))
        since_start = self.since_start[group.name]
        moved = since_start[move.index] if move.index is not None else move.matrix @ since_start
        static_gain = float(torch.sum(static * (moved - since_start)))

        def update() -> None:
            self._update(group, move)
            self.since_start[group.name] = moved

        return self._commit(moves, update, static_gain)

    def _solve_heads(self, unit: _Unit) -> bool:
        """Heads and their within-head maps at once (see the module docstring)."""
        heads = unit.group
        count = heads.size
        covered = {(m.param, m.axis) for f in unit.fibres for m in f.members}
        score = torch.zeros(count, count, dtype=torch.float64)
        for member in heads.members:
            if member.param in self.a and (member.param, member.axis) not in covered:
                score += _product(self.a[member.param], self.b[member.param], member, count)
        costs: dict[str, torch.Tensor] = {}
        for fibre in unit.fibres:
            cost = sum(_fibred_product(self.a[m.param], self.b[m.param], m, fibre.size, count)
                       for m in fibre.members if m.param in self.a)
            if not isinstance(cost, torch.Tensor):
                continue
            costs[fibre.name] = cost  # (a, c, d, d)
            if self.kinds[fibre.name] == "orthogonal":
                score += torch.linalg.matrix_norm(cost, ord="nuc")
            else:
                score += torch.tensor([[assignment_value(cost[a, c]) for c in range(count)] for a in range(count)])
        order = torch.arange(count) if unit.heads_fixed else best_assignment(score)
        within: dict[str, torch.Tensor] = {}
        for name, cost in costs.items():
            chosen = cost[torch.arange(count), order]  # (a, d, d): A's head a against B's head order[a]
            if self.kinds[name] == "orthogonal":
                within[name] = procrustes(chosen)
            else:
                within[name] = torch.stack([best_assignment(c.clone()) for c in chosen])
        moves: list[tuple[Member, _Move]] = []
        if not torch.equal(order, torch.arange(count)):
            moves += [(m, _Move(index=order)) for m in heads.members if m.param in self.a]
        for fibre in unit.fibres:
            if fibre.name in within:
                move = _Move(matrix=within[fibre.name]) if within[fibre.name].is_floating_point() else _Move(index=within[fibre.name])
                moves += [(m, _Move(matrix=move.matrix, index=move.index, fibred=True)) for m in fibre.members if m.param in self.a]
        if not moves:
            return False

        def update() -> None:
            if not unit.heads_fixed:
                self.transforms[heads.name] = self.transforms[heads.name][order]
            for fibre in unit.fibres:
                carried = self.transforms[fibre.name][order]
                self.transforms[fibre.name] = _compose(within.get(fibre.name), carried, fibre.size)

        return self._commit(moves, update)

    def _update(self, group: PermutationGroup, move: _Move) -> None:
        current = self.transforms[group.name]
        if move.index is not None:
            self.transforms[group.name] = current[move.index]
        else:
            self.transforms[group.name] = _compose(move.matrix, current, group.size)

    def _commit(self, moves: Sequence[tuple[Member, _Move]], update: Callable[[], None], static_gain: float = 0.0) -> bool:
        """Apply ``moves`` to B's tensors; keep them (and run ``update``) only if the objective improves.

        ``static_gain`` is the change of the static terms (module docstring) under the same move."""
        touched = sorted({m.param for m, _ in moves})
        saved = {p: self.b[p] for p in touched}
        for member, move in moves:  # heads first, then fibres: the order of ``moves``
            self.b[member.param] = move.apply(self.b[member.param], member)
        after = {p: self._inner(p) for p in touched}
        gain = sum(after[p] - self.inners[p] for p in touched) + static_gain
        if not is_improvement(gain, self.value, self.tol):
            self.b.update(saved)
            return False
        self.value += gain
        self.inners.update(after)
        update()
        return True


@dataclass
class _Move:
    """A change of coordinates along one member: a gather ``index`` or a ``matrix`` (per head when ``fibred``)."""

    matrix: torch.Tensor | None = None
    index: torch.Tensor | None = None
    fibred: bool = False

    def apply(self, tensor: torch.Tensor, member: Member) -> torch.Tensor:
        size = (self.index if self.index is not None else self.matrix).shape[-1]
        if member.is_plain and not self.fibred and tensor.shape[member.axis] == size:  # the whole axis: no gather
            if self.index is not None:
                return tensor.index_select(member.axis, self.index.to(tensor.device))
            moved = tensor.movedim(member.axis, 0)
            product = self.matrix.to(moved) @ moved.reshape(size, -1)
            return product.reshape(moved.shape).movedim(0, member.axis)
        moved, flat, shape = _block(tensor, member, size)
        block = moved[flat].reshape(*shape, -1)  # (*outer, size, inner, rest)
        if self.index is not None and not self.fibred:
            updated = block.index_select(-3, self.index.to(block.device))
        elif self.index is not None:
            heads = shape[0]
            middle = block.reshape(heads, -1, *block.shape[-3:])
            picked = self.index.to(block.device).view(heads, 1, -1, 1, 1).expand(-1, middle.shape[1], -1, *middle.shape[-2:])
            updated = torch.gather(middle, 2, picked).reshape(block.shape)
        elif self.fibred:
            heads = shape[0]
            middle = block.reshape(heads, -1, *block.shape[-3:])
            updated = torch.einsum("hij,hmjsr->hmisr", self.matrix.to(block), middle).reshape(block.shape)
        else:
            updated = torch.einsum("ij,...jsr->...isr", self.matrix.to(block), block)
        result = moved.clone()
        result[flat] = updated.reshape(flat.numel(), *moved.shape[1:])
        return result.movedim(0, member.axis)


def _block(tensor: torch.Tensor, member: Member, size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The tensor with the member's axis first, the flat positions, and the positions' shape ``(*outer, size, inner)``."""
    positions = layout_positions(member, size)
    return tensor.movedim(member.axis, 0), positions.flatten().to(tensor.device), tuple(positions.shape)


def _product(a: torch.Tensor, b: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """``D[i, j] = <A's index i, B's index j>`` along one member, in float64."""
    return (member_matrix(a, member, size) @ member_matrix(b, member, size).T).to(torch.float64).cpu()


def _fibred_product(a: torch.Tensor, b: torch.Tensor, member: Member, size: int, heads: int) -> torch.Tensor:
    """``D[a, c, i, j] = <A's head a index i, B's head c index j>`` along a within-head member."""
    def per_head(tensor: torch.Tensor) -> torch.Tensor:
        moved, flat, shape = _block(tensor, member, size)
        block = moved[flat].reshape(heads, -1, size, shape[-1], moved.shape[1:].numel())
        return block.movedim(2, 1).reshape(heads, size, -1)
    return torch.einsum("aik,cjk->acij", per_head(a), per_head(b)).to(torch.float64).cpu()


def _compose(delta: torch.Tensor | None, current: torch.Tensor, size: int) -> torch.Tensor:
    """The transform ``delta`` after ``current`` (each a permutation index or a matrix; stacks per head)."""
    if delta is None:
        return current
    if not delta.is_floating_point():
        if current.is_floating_point():
            return torch.gather(current, -2, delta.unsqueeze(-1).expand(*delta.shape, size))
        return torch.gather(current, -1, delta)
    return delta @ _as_matrix(current, size)


def _as_matrix(transform: torch.Tensor, size: int) -> torch.Tensor:
    """A transform as a float64 matrix (``P[i, p[i]] = 1`` for a permutation)."""
    if transform.is_floating_point():
        return transform.to(torch.float64)
    return torch.nn.functional.one_hot(transform, size).to(torch.float64)


def best_assignment(score: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` maximising ``sum_i score[i, p[i]]``."""
    result = linear_assignment(score.to(torch.float64).numpy(), maximize=True)
    return torch.as_tensor(np.asarray(result.columns), dtype=torch.long)


def assignment_value(score: torch.Tensor) -> float:
    """The largest ``sum_i score[i, p[i]]`` over permutations ``p``."""
    return float(linear_assignment(score.to(torch.float64).numpy(), maximize=True).value)
