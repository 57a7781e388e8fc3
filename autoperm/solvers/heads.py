"""Joint matching of attention heads and the within-head dimensions fibred over them.

For a head group ``H`` and the groups ``F`` fibred over it (query/key dims, value/output dims),
every pair of heads ``(a, b)`` is scored by the best within-head assignment of each ``F``
(one small LAP per pair and per ``F``) plus the head-level cost of ``H``'s members that no
``F`` member refines; one more LAP over those scores assigns the heads, and each head keeps the
within-head assignment of its pair. Planted head and within-head permutations are recovered
exactly, which alternating the two kinds of group one at a time does not guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from autoperm.spec import Member, PermutationGroup, PermutationSpec, member_matrix, permute_tensor

__all__ = ["fibred_over", "solve_heads"]


def fibred_over(spec: PermutationSpec, group: PermutationGroup) -> list[PermutationGroup]:
    """The active groups whose permutations are one per index of ``group``."""
    return [g for g in spec.active_groups if g.per == group.name]


def _covered(head_member: Member, fibres: list[tuple[PermutationGroup, Member]]) -> bool:
    """Whether a head member's positions are refined by a fibred member (same blocks)."""
    return any(
        m.param == head_member.param and m.axis == head_member.axis and m.offset == head_member.offset
        and m.outer and m.outer[0][1] == head_member.inner
        for _, m in fibres
    )


def solve_heads(
    spec: PermutationSpec,
    group: PermutationGroup,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Re-solve head group ``group`` together with its fibred groups, the others held fixed.

    Args:
        spec: the spec.
        group: a group other groups are fibred over.
        a, b: cost tensors of models A and B (on the device the matmuls should run on).
        perms: current permutations (not modified).

    Returns:
        ``(new permutations of group and its fibres, old objective part, new objective part)``.

    Complexity:
        ``O(H^2 (d^3 + d^2 k))`` for ``H`` heads of ``d`` dims and ``k`` other entries per dim.
    """
    fibres = fibred_over(spec, group)
    skip = {group.name, *(f.name for f in fibres)}
    heads = group.size
    fibre_members = [(f, m) for f in fibres for m in f.members if m.param in a]
    head_scores = np.zeros((heads, heads))
    for member in group.members:
        if member.param not in a or _covered(member, fibre_members):
            continue
        b_other = permute_tensor(spec, perms, member.param, b[member.param], skip=skip)
        head_scores += (member_matrix(a[member.param], member, heads) @ member_matrix(b_other, member, heads).T).double().cpu().numpy()
    pair_costs: dict[str, np.ndarray] = {}
    for fibre in fibres:
        total = None
        for f, member in fibre_members:
            if f is not fibre:
                continue
            b_other = permute_tensor(spec, perms, member.param, b[member.param], skip=skip)
            a_matrix = member_matrix(a[member.param], member, fibre.size, fibred=True)  # (H, d, k)
            b_matrix = member_matrix(b_other, member, fibre.size, fibred=True)
            cost = torch.einsum("aik,bjk->abij", a_matrix.double(), b_matrix.double())
            total = cost if total is None else total + cost
        if total is not None:
            pair_costs[fibre.name] = total.cpu().numpy()
    best: dict[str, np.ndarray] = {}
    scores = head_scores.copy()
    for name, cost in pair_costs.items():
        size = cost.shape[-1]
        assignment = np.zeros((heads, heads, size), dtype=np.int64)
        for i in range(heads):
            for j in range(heads):
                rows, columns = linear_sum_assignment(cost[i, j], maximize=True)
                assignment[i, j] = columns
                scores[i, j] += cost[i, j][rows, columns].sum()
        best[name] = assignment
    old_value = _value(head_scores, pair_costs, perms, group, fibres)
    _, head_assignment = linear_sum_assignment(scores, maximize=True)
    new_perms = {group.name: torch.as_tensor(head_assignment, dtype=torch.long)}
    for fibre in fibres:
        if fibre.name in best:
            rows = best[fibre.name][np.arange(heads), head_assignment]
            new_perms[fibre.name] = torch.as_tensor(rows, dtype=torch.long)
    new_value = float(scores[np.arange(heads), head_assignment].sum())
    return new_perms, old_value, new_value


def _value(head_scores: np.ndarray, pair_costs: dict[str, np.ndarray], perms: Mapping[str, torch.Tensor],
           group: PermutationGroup, fibres: list[PermutationGroup]) -> float:
    """The objective part of the current permutations, in the same terms as the scores."""
    assignment = perms[group.name].cpu().numpy()
    index = np.arange(group.size)
    value = float(head_scores[index, assignment].sum())
    for fibre in fibres:
        if fibre.name not in pair_costs:
            continue
        within = perms[fibre.name].cpu().numpy()
        cost = pair_costs[fibre.name]
        for head in index:
            block = cost[head, assignment[head]]
            value += float(block[np.arange(block.shape[0]), within[head]].sum())
    return value
