"""Joint matching of attention heads and the within-head dimensions fibred over them.

For a head group ``H`` and a set ``S`` of groups fibred over it (query/key dims, value/output
dims), every pair of heads ``(a, b)`` is scored by the best within-head assignment of each
fibre in ``S`` (one small LAP per pair and per fibre) plus the head-level cost of ``H``'s members
that no fibre of ``S`` refines; one more LAP over those scores assigns the heads, and each head
keeps the within-head assignment of its pair. Planted head and within-head permutations are
recovered exactly, which alternating the two kinds of group one at a time does not guarantee.

The scores are exact (they are the objective's change) when no two fibres of ``S`` share a
tensor: fibres that do (grouped-query attention, where the query heads inside a key/value head
and the value dims both reach ``o_proj``; the nested channel multipliers of grouped convs) are
put in different parts by :func:`fibre_parts` and solved one part at a time, the fibres outside
the part *attached* to model B's heads: head ``j`` of B keeps its within-head permutation
wherever the head assignment moves it (:func:`attach_fibres`, :func:`carry_fibres`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

from autoperm.solvers.costs import product_dtype, sliced_matrix_product
from autoperm.solvers.lap import LapMethod, linear_assignment, linear_assignments
from autoperm.spec import Member, PermutationGroup, PermutationSpec, layout_positions, member_matrix, permute_tensor

__all__ = ["attach_fibres", "carry_fibres", "fibre_parts", "fibred_over", "shared_within", "solve_heads", "solve_shared"]


def fibred_over(spec: PermutationSpec, group: PermutationGroup) -> list[PermutationGroup]:
    """The active groups whose permutations are one per index of ``group``."""
    return [g for g in spec.active_groups if g.per == group.name]


def shared_within(spec: PermutationSpec, group: PermutationGroup) -> list[PermutationGroup]:
    """Plain groups that permute the inside of every block of ``group`` alike (one permutation shared
    by all heads): a grouped conv whose input side cannot tell its groups apart gives the channels
    of a residual stream the structure heads x shared within-head permutation.

    Such a pair is a Kronecker product of two groups; coordinate descent over the two alone gets
    stuck when the heads are wrong (the within-head cost then mixes mismatched heads), so
    :func:`solve_shared` solves them together.
    """
    laid = [
        g for g in spec.active_groups
        if g.per is None and g is not group and any(_covered(m, [(g, n) for n in g.members]) for m in group.members)
    ]
    return laid


def fibre_parts(spec: PermutationSpec, group: PermutationGroup) -> list[list[PermutationGroup]]:
    """Split the fibres of ``group`` into parts whose fibres touch pairwise disjoint tensors.

    Within one part the per-pair within-head LAPs are independent, so their summed values are
    the exact objective of each head pairing. Greedy colouring in spec order.
    """
    parts: list[tuple[list[PermutationGroup], set[str]]] = []
    for fibre in fibred_over(spec, group):
        params = {m.param for m in fibre.members}
        for part, used in parts:
            if not params & used:
                part.append(fibre)
                used |= params
                break
        else:
            parts.append(([fibre], set(params)))
    return [part for part, _ in parts]


def attach_fibres(
    perms: Mapping[str, torch.Tensor], group: PermutationGroup, fibres: Sequence[PermutationGroup]
) -> dict[str, torch.Tensor]:
    """``perms`` with each fibre's rows indexed by model B's head instead of A's.

    With ``p = perms[group]``, B's head ``p[i]`` sits at position ``i`` and is permuted inside by
    row ``i`` of a fibre; attached, that row belongs to head ``p[i]`` of B, so gathering B with
    ``group`` skipped applies every head's own within-head permutation in B's head order.
    """
    inverse = torch.argsort(perms[group.name])
    attached = dict(perms)
    for fibre in fibres:
        attached[fibre.name] = perms[fibre.name][inverse]
    return attached


def carry_fibres(
    perms: Mapping[str, torch.Tensor], group: PermutationGroup, fibres: Sequence[PermutationGroup], heads: torch.Tensor
) -> dict[str, torch.Tensor]:
    """New rows of ``fibres`` when ``group`` moves to ``heads``: each B head keeps its row."""
    inverse = torch.argsort(perms[group.name])
    return {fibre.name: perms[fibre.name][inverse[heads]] for fibre in fibres}


def _covered(head_member: Member, fibres: list[tuple[PermutationGroup, Member]], shape: Sequence[int] | None = None) -> bool:
    """Whether a fibre member refines all of a head member's positions (same blocks), or, for
    fibres along another axis than the heads' (``per_axis``, stacked experts), whether their
    members on that tensor together cover the whole axis they permute (``shape``: the tensor's)."""
    along = [(fibre, m) for fibre, m in fibres if m.param == head_member.param and m.per_axis == head_member.axis]
    if along and shape is not None and head_member.is_plain:
        axes = {m.axis for _, m in along}
        positions = torch.cat([layout_positions(m, fibre.size).flatten() for fibre, m in along])
        if len(axes) == 1 and positions.unique().numel() == shape[axes.pop()]:
            return True
    for fibre, m in fibres:
        if m.per_axis is not None:
            continue
        if not (m.param == head_member.param and m.axis == head_member.axis and m.offset == head_member.offset
                and m.outer and m.outer[0][1] == head_member.inner):
            continue
        span = fibre.size * m.inner
        for count, _ in m.outer[1:]:
            span *= count
        if span == head_member.inner:
            return True
    return False


def solve_heads(
    spec: PermutationSpec,
    group: PermutationGroup,
    part: Sequence[PermutationGroup],
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    leave_out: Collection[str] = (),
    method: LapMethod = "auto",
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Re-solve head group ``group`` together with the fibres in ``part``, the others held fixed.

    Args:
        spec: the spec.
        group: a group other groups are fibred over.
        part: fibres of ``group`` that touch pairwise disjoint tensors (see :func:`fibre_parts`).
        a, b: cost tensors of models A and B (on the device the matmuls should run on).
        perms: current permutations, with the fibres outside ``part`` attached to B's heads
            (:func:`attach_fibres`); not modified.
        leave_out: tensors whose terms are left out of the scores (an informed first sweep leaves
            out the tensors of groups it has not visited yet).
        method: the linear assignment backend (:func:`autoperm.solvers.lap.linear_assignment`).

    Returns:
        ``(new permutations of group and the fibres of part, old objective part, new objective
        part)``; the two values are in the same terms, so their difference is the gain.

    Complexity:
        ``O(H^2 (d^3 + d^2 k))`` for ``H`` heads of ``d`` dims and ``k`` other entries per dim.
    """
    skip = {group.name, *(f.name for f in part)}
    heads = group.size
    fibre_members = [(f, m) for f in part for m in f.members if m.param in a and m.param not in leave_out]
    head_scores = _head_scores(spec, group, fibre_members, a, b, perms, skip, leave_out)
    pair_costs: dict[str, np.ndarray] = {}
    for fibre in part:
        total = None
        for f, member in fibre_members:
            if f is not fibre:
                continue
            cost = _pair_costs(spec, perms, member, fibre.size, a[member.param], b[member.param], skip)
            total = cost if total is None else total.add_(cost)
        if total is not None:
            pair_costs[fibre.name] = total.cpu().numpy()
    best: dict[str, np.ndarray] = {}
    scores = head_scores.copy()
    for name, cost in pair_costs.items():
        size = cost.shape[-1]
        solutions = linear_assignments(cost.reshape(heads * heads, size, size), method=method)
        best[name] = np.stack([solution.columns for solution in solutions]).reshape(heads, heads, size)
        scores += np.array([solution.value for solution in solutions]).reshape(heads, heads)
    old_value = _value(head_scores, pair_costs, perms, group, part)
    head_assignment = linear_assignment(scores, method=method).columns
    new_perms = {group.name: torch.as_tensor(head_assignment, dtype=torch.long)}
    for fibre in part:
        if fibre.name in best:
            rows = best[fibre.name][np.arange(heads), head_assignment]
            new_perms[fibre.name] = torch.as_tensor(rows, dtype=torch.long)
    new_value = float(scores[np.arange(heads), head_assignment].sum())
    return new_perms, old_value, new_value


def _pair_costs(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    member: Member,
    size: int,
    a: torch.Tensor,
    b: torch.Tensor,
    skip: set[str],
) -> torch.Tensor:
    """``(H, H, d, d)`` float64 within-head costs of one fibre member: entry ``[a, b]`` is
    ``A_a @ B_b^T`` for head ``a`` of A and head ``b`` of B (``B`` permuted on every group but ``skip``).

    All head pairs come from one product of the ``(H d, k)`` member matrices, sliced along ``k``
    (:func:`autoperm.solvers.costs.sliced_matrix_product`): in float32 for half-precision tensors
    (whose products are exact in float32; the sums are rounded as in the group costs), in float64
    otherwise; no float64 copy of either tensor is made.
    """
    b_other = permute_tensor(spec, perms, member.param, b, skip=skip)
    a_matrix = member_matrix(a, member, size, fibred=True)  # (H, d, k)
    b_matrix = member_matrix(b_other, member, size, fibred=True)
    heads = a_matrix.shape[0]
    half = product_dtype(a.dtype) != a.dtype and product_dtype(b.dtype) != b.dtype
    dtype = torch.float32 if half else torch.float64
    product = sliced_matrix_product(a_matrix.reshape(heads * size, -1), b_matrix.reshape(heads * size, -1), dtype)
    return product.view(heads, size, heads, size).permute(0, 2, 1, 3).to(torch.float64, memory_format=torch.contiguous_format)


def _head_scores(
    spec: PermutationSpec,
    group: PermutationGroup,
    refined: list[tuple[PermutationGroup, Member]],
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    skip: set[str],
    leave_out: Collection[str],
) -> np.ndarray:
    """``(H, H)`` head-level cost of ``group``'s members that no member in ``refined`` refines."""
    heads = group.size
    scores = np.zeros((heads, heads))
    for member in group.members:
        if member.param not in a or member.param in leave_out or _covered(member, refined, a[member.param].shape):
            continue
        b_other = permute_tensor(spec, perms, member.param, b[member.param], skip=skip)
        a_matrix, b_matrix = member_matrix(a[member.param], member, heads), member_matrix(b_other, member, heads)
        dtype = product_dtype(torch.promote_types(a_matrix.dtype, b_matrix.dtype))
        scores += sliced_matrix_product(a_matrix, b_matrix, dtype).double().cpu().numpy()
    return scores


def _value(head_scores: np.ndarray, pair_costs: dict[str, np.ndarray], perms: Mapping[str, torch.Tensor],
           group: PermutationGroup, fibres: Sequence[PermutationGroup]) -> float:
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


def solve_shared(
    spec: PermutationSpec,
    group: PermutationGroup,
    shared: PermutationGroup,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    leave_out: Collection[str] = (),
    method: LapMethod = "auto",
) -> tuple[dict[str, torch.Tensor], float, float] | None:
    """Re-solve head group ``group`` together with ``shared``, a within-head group common to all heads.

    Every pair of heads ``(a, b)`` gets the cost ``C_ab`` of the shared group's members laid over
    the heads, and the score of its best within-head assignment plus the head-level cost of the
    members the shared group does not refine; a LAP over the scores assigns the heads, and one LAP
    over ``sum_a C_{a, heads[a]}`` gives the one within-head permutation they share. (With a
    planted permutation every pair's best within-head assignment is the planted one, so both are
    recovered.) Members of the shared group that are not laid over the heads (a grouped conv's
    input axis) are left to its own solve; the caller measures the exact gain of the move.
    ``method`` is the linear assignment backend of every LAP (as in :func:`solve_heads`).

    Returns:
        ``(new permutations of group and shared, old value, new value)`` in the same terms, or
        ``None`` when no member of ``shared`` is laid over the heads here.
    """
    skip = {group.name, shared.name}
    heads, size = group.size, shared.size
    laid = [
        (shared, m) for m in shared.members
        if m.param in a and m.param not in leave_out and m.outer and m.outer[0][0] == heads
    ]
    if not laid:
        return None
    head_scores = _head_scores(spec, group, laid, a, b, perms, skip, leave_out)
    pair = None
    for _, member in laid:
        cost = _pair_costs(spec, perms, member, size, a[member.param], b[member.param], skip)
        pair = cost if pair is None else pair.add_(cost)
    assert pair is not None
    costs = pair.cpu().numpy()
    solutions = linear_assignments(costs.reshape(heads * heads, size, size), method=method)
    scores = head_scores + np.array([solution.value for solution in solutions]).reshape(heads, heads)
    head_assignment = linear_assignment(scores, method=method).columns
    index = np.arange(heads)
    within_cost = costs[index, head_assignment].sum(axis=0)
    within = linear_assignment(within_cost, method=method).columns
    current_heads = perms[group.name].cpu().numpy()
    current_within = perms[shared.name].cpu().numpy()
    old_value = float(head_scores[index, current_heads].sum()) + float(
        costs[index, current_heads].sum(axis=0)[np.arange(size), current_within].sum()
    )
    new_value = float(head_scores[index, head_assignment].sum()) + float(within_cost[np.arange(size), within].sum())
    new = {group.name: torch.as_tensor(head_assignment, dtype=torch.long), shared.name: torch.as_tensor(within, dtype=torch.long)}
    return new, old_value, new_value
