"""Warm-started weight matching of a moving target against a fixed model: STE's inner loop.

The straight-through estimator (Git Re-Basin, arXiv 2209.04836, Sec. 3.3) projects its learned
copy ``theta~`` onto the closest permutation of ``theta_B`` at *every* step, by weight matching
warm-started from the previous step's permutation. Between two steps ``theta~`` moves little,
so the previous permutation usually is still optimal for most groups. :class:`WarmProjection`
exploits that:

- it keeps ``pi(B)`` (B under the current permutations) and, per group, the cost
  ``C = sum_m theta~_m @ pi(B)_m^T`` relative to the current assignment (the identity);
- before solving a group's linear assignment problem (LAP) it checks in ``O(n^2)`` per pass
  whether the identity is still optimal for ``C``: the identity is an optimal assignment of
  ``max sum_i C[i, p(i)]`` iff potentials ``v`` exist with ``v_k - v_j <= C[k, k] - C[k, j]``
  for all ``k, j`` (no positive cycle in the exchange graph; LP duality). Bellman-Ford passes,
  warm-started from the group's potentials of the previous step, find them in a few passes
  when the assignment is still optimal; only when they do not settle is the LAP solved
  (:func:`autoperm.solvers.lap.linear_assignment`, with the backend chosen by ``lap``);
- coordinate descent sweeps the groups in a fresh random order until no group changes, as
  weight matching does (the result is a coordinate-wise optimum).

Specs with fibred groups (attention heads and their within-head dimensions) are projected by
:func:`autoperm.weight_matching` itself, warm-started: correct, but without the shortcut.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from autoperm.solvers.lap import LapMethod, linear_assignment
from autoperm.solvers.result import is_cost_tensor, is_improvement
from autoperm.solvers.weight_matching import weight_matching
from autoperm.spec import PermutationGroup, PermutationSpec, member_matrix
from autoperm.spec.apply import permute_tensor

__all__ = ["ProjectionStatistics", "WarmProjection"]

logger = logging.getLogger(__name__)

_CHECK_PASSES = 10
"""Bellman-Ford passes before the optimality check gives up and the LAP is solved instead."""


@dataclass
class ProjectionStatistics:
    """How the projections of one STE run were made.

    Attributes:
        projections: calls of :meth:`WarmProjection.project`.
        sweeps: coordinate-descent sweeps over all of them.
        certified: group visits where the optimality check proved the current assignment optimal
            (no LAP solved).
        lap_solves: group visits where the LAP was solved.
        changes: LAP solves that changed the permutation.
        fallback: whether the spec needed :func:`autoperm.weight_matching` (fibred groups).
    """

    projections: int = 0
    sweeps: int = 0
    certified: int = 0
    lap_solves: int = 0
    changes: int = 0
    fallback: bool = False

    def to_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


class WarmProjection:
    """Project targets onto permutations of a fixed state dict B, warm-starting every call.

    Args:
        spec: the permutation spec.
        state_dict_b: the model whose permutations are searched (not modified).
        perms: the starting permutations (e.g. weight matching of A against B).
        seed: seeds the group order of the sweeps.
        device: where the cost matmuls run.
        max_sweeps: the most coordinate-descent sweeps per projection.
        tol: relative gain below which a LAP solution does not replace the current assignment.
        lap: the linear assignment backend (:func:`autoperm.solvers.lap.linear_assignment`), also
            of the weight matching that projects specs with fibred groups.

    Example:
        >>> projection = WarmProjection(spec, sd_b, weight_matching(spec, sd_a, sd_b).perms)
        >>> perms = projection.project(learned)          # learned: {param: tensor}, cost tensors
        >>> permuted_b = projection.permuted             # pi(B) for every permuted entry
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_dict_b: Mapping[str, torch.Tensor],
        perms: Mapping[str, torch.Tensor],
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_sweeps: int = 100,
        tol: float = 1e-9,
        lap: LapMethod = "auto",
    ):
        self.spec = spec
        self.lap: LapMethod = lap
        self.device = torch.device(device)
        self.b = {name: t.detach().to(self.device) for name, t in state_dict_b.items()}
        self.perms = {name: p.clone().to(torch.long).cpu() for name, p in perms.items()}
        self.generator = np.random.default_rng(seed)
        self.seed = seed
        self.max_sweeps = max_sweeps
        self.tol = tol
        self.statistics = ProjectionStatistics(fallback=any(g.per is not None for g in spec.active_groups))
        self.groups = [g for g in spec.active_groups if g.per is None]
        self.terms: dict[str, list] = {
            g.name: [m for m in g.members if is_cost_tensor(m.param, self.b[m.param])] for g in self.groups
        }
        self.potentials = {g.name: np.zeros(g.size) for g in self.groups}
        self.permuted = {name: permute_tensor(spec, self.perms, name, self.b[name]) for name in spec.members_by_param}

    def project(self, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The permutations of B closest to ``target`` (a coordinate-wise optimum), warm-started.

        Args:
            target: ``{param: tensor}`` with at least every cost tensor the spec permutes
                (weights, biases, norm scale/shift); other entries are ignored.

        Returns:
            ``{group name: LongTensor}``, also kept as the start of the next call; afterwards
            :attr:`permuted` holds B under them.
        """
        self.statistics.projections += 1
        if self.statistics.fallback:
            return self._project_by_weight_matching(target)
        for _ in range(self.max_sweeps):
            self.statistics.sweeps += 1
            changed = False
            for index in self.generator.permutation(len(self.groups)):
                changed |= self._visit(self.groups[index], target)
            if not changed:
                break
        return {name: p.clone() for name, p in self.perms.items()}

    def _visit(self, group: PermutationGroup, target: Mapping[str, torch.Tensor]) -> bool:
        """Re-solve one group against ``target`` with the others fixed; whether it changed."""
        if not self.terms[group.name]:
            return False
        cost = self._cost(group, target)
        potentials = _certify(cost, self.potentials[group.name], self.tol)
        if potentials is not None:
            self.statistics.certified += 1
            self.potentials[group.name] = potentials
            return False
        self.statistics.lap_solves += 1
        solution = linear_assignment(cost, method=self.lap)
        columns = solution.columns
        old_value = float(np.trace(cost))
        if not is_improvement(solution.value - old_value, old_value, self.tol):
            # optimal after all: settle the potentials so that the next step's check starts from them
            settled = _certify(cost, self.potentials[group.name], self.tol, passes=group.size)
            if settled is not None:
                self.potentials[group.name] = settled
            return False
        self.statistics.changes += 1
        relative = torch.as_tensor(columns, dtype=torch.long)
        self.perms[group.name] = self.perms[group.name][relative]
        settled = _certify(cost[:, columns], self.potentials[group.name][columns], self.tol, passes=group.size)
        self.potentials[group.name] = settled if settled is not None else self.potentials[group.name][columns]
        for name in {m.param for m in group.members}:
            self.permuted[name] = permute_tensor(self.spec, self.perms, name, self.b[name])
        return True

    def _cost(self, group: PermutationGroup, target: Mapping[str, torch.Tensor]) -> np.ndarray:
        """``sum_m target_m @ pi(B)_m^T`` along the group's axes, float64 ``(n, n)``."""
        total: torch.Tensor | None = None
        with torch.no_grad():
            for member in self.terms[group.name]:
                a = member_matrix(target[member.param].detach().to(self.device), member, group.size)
                b = member_matrix(self.permuted[member.param], member, group.size)
                product = a @ b.T
                total = product if total is None else total.add_(product)
        assert total is not None
        return total.double().cpu().numpy()

    def _project_by_weight_matching(self, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full_target = {**self.b, **{name: t.detach() for name, t in target.items()}}
        result = weight_matching(
            self.spec, full_target, self.b, init_perms=self.perms, seed=int(self.generator.integers(2**31)),
            device=self.device, lap=self.lap,
        )
        self.statistics.sweeps += result.n_iter
        self.perms = {name: p.clone() for name, p in result.perms.items()}
        self.permuted = {name: permute_tensor(self.spec, self.perms, name, self.b[name]) for name in self.spec.members_by_param}
        return {name: p.clone() for name, p in self.perms.items()}


def _certify(cost: np.ndarray, start: np.ndarray, tol: float, passes: int = _CHECK_PASSES) -> np.ndarray | None:
    """Potentials proving the identity optimal for ``max sum_i cost[i, p(i)]``, or ``None``.

    The identity is optimal iff some ``v`` has ``v_j >= v_k + cost[k, j] - cost[k, k]`` for all
    ``k, j`` (LP duality: ``u_k = cost[k, k] - v_k`` and ``v`` are then feasible duals of equal
    objective). A swap of two assignments that gains rejects at once; otherwise Bellman-Ford
    passes from ``start`` raise ``v`` until every constraint holds;
    they settle in a few passes when the previous step's potentials were nearly right, and never
    when the identity is not optimal (a positive cycle), so after ``passes`` passes (default
    :data:`_CHECK_PASSES`) the caller solves the LAP. After a LAP the caller settles the
    potentials of the optimal assignment with up to ``n`` passes (enough without a positive
    cycle), the warm start of the next step's check. ``tol`` (relative to the largest
    ``|cost|``) absorbs rounding.
    """
    diagonal = np.diag(cost)
    slack = cost - diagonal[:, None]  # slack[k, j] = cost[k, j] - cost[k, k]
    margin = tol * max(1.0, float(np.abs(cost).max()))
    if float((slack + slack.T).max()) > margin:  # swapping two assignments gains: not optimal
        return None
    potentials = start.copy()
    for _ in range(passes):
        needed = (potentials[:, None] + slack).max(axis=0)
        if np.all(needed <= potentials + margin):
            return potentials
        potentials = np.maximum(potentials, needed)
    return None
