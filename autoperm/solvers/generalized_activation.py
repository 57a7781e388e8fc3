"""Generalised activation matching: each group's transform of its kind, from activations on data.

The activation-space counterpart of :mod:`autoperm.solvers.generalized` (Theus et al.,
"Generalized Linear Mode Connectivity for Transformers", arXiv 2506.22712; Git Re-Basin,
arXiv 2209.04836, Section 3.1 for permutations). Both models run on the same inputs; each group
is observed where its axis shows in the traced graph:

- the activation sites inference recorded for it (``PermutationGroup.activations``);
- the output of every layer that writes it: an ``AffineSite`` whose weight axis is a member of
  the group moves its output channels with the group, with the member's layout. Within-head
  groups are observed there only (inference records no site for them).

A transform ``T`` of a group changes B's activations on it to ``T x_B`` and leaves the function
alone, so each group is solved once, from B's activations as they are:

- a group solved as a permutation (:func:`autoperm.solvers.generalized.solved_kind`): linear
  assignment on the Pearson correlation of A's and B's units, summed over sites (what
  :func:`autoperm.solvers.activation_matching` does);
- a group solved as an orthogonal map: orthogonal Procrustes on the cross moment
  ``C = sum_sites E[x_A x_B^T]``, i.e. ``min ||X_A - T X_B||_F``, on the complement of the ones
  vector for ``fixes_ones`` groups. The moment is not centred: the map must carry the means too;
  unit-wise standardising (correlation) is not invariant under rotations;
- heads with their within-head groups at once: B's head ``c`` scores against A's head ``a`` by
  ``||C_ac||_*`` (nuclear norm, Procrustes' optimum) for an orthogonal within-head group and by
  the assignment value of the correlation block for a permutation one; one linear assignment
  over heads, then each head's map.

Invertible and scale groups are solved as the orthogonal maps and permutations above: give this
solver the balanced forms of both models (:mod:`autoperm.solvers.gauge`, as :func:`autoperm.align`
does with ``symmetries="full"``), which differ in those groups by such maps only. Every transform
found is an element of its group, so the transformed B computes B's function exactly.

Groups that no activation shows are solved by generalised weight matching with the others
held where activations put them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from autoperm.data import input_batches
from autoperm.errors import SolverError
from autoperm.solvers.activation_matching import CrossMoments
from autoperm.solvers.generalized import (
    GeneralizedResult,
    Symmetries,
    assignment_value,
    best_assignment,
    generalized_matching,
    procrustes,
    solved_kind,
)
from autoperm.solvers.result import check_state_dicts, is_cost_tensor
from autoperm.spec import ActivationSite, PermutationGroup, PermutationSpec, apply_transform, identity_permutation, member_matrix
from autoperm.spec.runner import ActivationRunner, record_activations

__all__ = ["GeneralizedActivationResult", "generalized_activation_matching", "observation_sites"]

logger = logging.getLogger(__name__)


@dataclass
class GeneralizedActivationResult(GeneralizedResult):
    """What :func:`generalized_activation_matching` found (see :class:`GeneralizedResult`).

    ``objective`` and ``start_objective`` are the weight objective ``sum <W_A, T(W_B)>_F`` at the
    transforms found and at the identity; ``n_iter`` counts the sweeps of the weight-matching
    fallback.

    Attributes:
        fallback_groups: groups no activation shows, solved by generalised weight matching.
        sites: the number of activations each observed group was matched on.
    """

    fallback_groups: tuple[str, ...] = ()
    sites: dict[str, int] = field(default_factory=dict)


def observation_sites(spec: PermutationSpec, group: PermutationGroup) -> tuple[ActivationSite, ...]:
    """Where ``group``'s axis shows: its recorded activation sites, then the outputs of its writers.

    A writer is an ``AffineSite`` of ``spec`` whose ``(weight, weight_axis)`` is a member of the
    group (not one of role ``"in"``): the call's output channels move with the group, laid out as
    the member is. A node already observed for the group is not added twice.
    """
    sites = list(group.activations)
    seen = {site.node for site in sites}
    members = {(m.param, m.axis): m for m in group.members if m.role != "in"}
    for writer in spec.affine_sites or ():
        member = members.get((writer.weight, writer.weight_axis))
        if member is None or writer.node in seen:
            continue
        seen.add(writer.node)
        sites.append(ActivationSite(node=writer.node, axis=writer.channel_axis, offset=member.offset, inner=member.inner,
                                    outer=member.outer))
    return tuple(sites)


def generalized_activation_matching(
    spec: PermutationSpec,
    runner: ActivationRunner,
    state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor],
    data: Any,
    symmetries: Symmetries = "orthogonal",
    batch_size: int = 500,
    max_batches: int | None = None,
    max_iter: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    sweep_tol: float = 0.0,
) -> GeneralizedActivationResult:
    """Align B to A with a transform of each group's kind, found from activations (module docstring).

    Args:
        spec: the spec; each group's ``kind`` (and ``fixes_ones``) bounds its transform. Give a
            canonical spec (:func:`autoperm.canonicalize`) and the canonical (with
            ``symmetries="full"`` also balanced) state dicts, so that both models are in one gauge.
        runner: yields the outputs of the spec's nodes for a state dict, e.g.
            ``autoperm.trace.GraphRunner.for_spec(spec, model)``; the canonical state dicts load
            into the model the spec was inferred from.
        state_dict_a: the reference model (not modified).
        state_dict_b: the model to align (not modified).
        data: ``(inputs, targets)`` batches or an ``(inputs, targets)`` pair; targets are ignored.
        symmetries: ``"permutation"``, ``"orthogonal"`` or ``"full"`` (:func:`solved_kind`).
        batch_size: batch size when ``data`` is a tensor pair.
        max_batches: use at most this many batches.
        max_iter, seed, device, sweep_tol: of the weight-matching fallback
            (:func:`autoperm.solvers.generalized.generalized_matching`).

    Returns:
        A :class:`GeneralizedActivationResult`; apply its ``transforms`` to ``state_dict_b`` with
        :func:`autoperm.apply_transform`.

    Raises:
        SolverError: mismatched state dicts, unknown ``symmetries`` or no batches in ``data``.

    Example:
        >>> spec_c, a_c = autoperm.canonicalize(spec, model_a.state_dict())
        >>> _, b_c = autoperm.canonicalize(spec, model_b.state_dict())
        >>> runner = autoperm.trace.GraphRunner.for_spec(spec, model_a)
        >>> result = generalized_activation_matching(spec_c, runner, a_c, b_c, (x_train, y_train))
        >>> aligned = autoperm.apply_transform(spec_c, result.transforms, b_c)
    """
    check_state_dicts(spec, [state_dict_a, state_dict_b])
    kinds = {g.name: solved_kind(g, symmetries) for g in spec.active_groups}
    batches = input_batches(data, batch_size, max_batches)
    if not batches:
        raise SolverError("activation matching got no batches from data; give (inputs, targets) batches")
    moments = _record(spec, runner, state_dict_a, state_dict_b, batches)
    transforms: dict[str, torch.Tensor] = {}
    for heads, fibres in _units(spec):
        transforms.update(_solve_unit(spec, heads, fibres, moments, kinds))
    fallback = tuple(g.name for g in spec.active_groups if g.name not in transforms)
    identity = identity_permutation(spec)
    transforms = {g.name: transforms.get(g.name, identity[g.name]) for g in spec.active_groups}
    sweeps, converged = 0, True
    if fallback:
        logger.info("activation matching: no activation shows %s; using generalised weight matching for them", list(fallback))
        moved = apply_transform(spec, transforms, state_dict_b)
        rest = spec.with_fixed(set(transforms) - set(fallback))
        found = generalized_matching(rest, state_dict_a, moved, symmetries, max_iter=max_iter, seed=seed,
                                     init_perms=identity_permutation(rest), device=device, sweep_tol=sweep_tol)
        transforms.update({name: found.transforms[name] for name in fallback})
        sweeps, converged = found.n_iter, found.converged
    start = _weight_objective(spec, state_dict_a, state_dict_b)
    objective = _weight_objective(spec, state_dict_a, apply_transform(spec, transforms, state_dict_b))
    logger.info("generalised activation matching: weight objective %.6g -> %.6g", start, objective)
    sites = {g.name: len(moments[g.name]) for g in spec.active_groups if moments.get(g.name)}
    return GeneralizedActivationResult(transforms, objective, start, sweeps, converged, [start, objective], kinds,
                                       fallback, sites)


def _units(spec: PermutationSpec) -> list[tuple[PermutationGroup, tuple[PermutationGroup, ...]]]:
    """Every active group that is not fibred, with its active fibres; and fixed heads with active fibres."""
    fibres: dict[str, list[PermutationGroup]] = {}
    for group in spec.active_groups:
        if group.per is not None:
            fibres.setdefault(group.per, []).append(group)
    units = [(group, tuple(fibres.get(group.name, ()))) for group in spec.active_groups if group.per is None]
    units += [(spec[name], tuple(own)) for name, own in fibres.items() if not spec[name].active]
    return units


def _record(spec: PermutationSpec, runner: ActivationRunner, state_dict_a: Mapping[str, torch.Tensor],
            state_dict_b: Mapping[str, torch.Tensor], batches: list[Any]) -> dict[str, list[CrossMoments]]:
    """``{group: one CrossMoments per observation site}``, both models run batch by batch.

    A fibred group's units are ordered head-major (``heads * size``)."""
    sites = {g.name: observation_sites(spec, g) for g in spec.active_groups}
    moments = {name: [CrossMoments() for _ in found] for name, found in sites.items()}
    nodes = sorted({site.node for found in sites.values() for site in found})
    if not nodes:
        return moments
    for batch in batches:
        outputs_a, outputs_b = (record_activations(runner, nodes, [batch], state_dict) for state_dict in (state_dict_a, state_dict_b))
        for group in spec.active_groups:
            fibred = group.per is not None
            for site, accumulated in zip(sites[group.name], moments[group.name]):
                a, b = (member_matrix(outputs[site.node][0], site, group.size, fibred) for outputs in (outputs_a, outputs_b))
                accumulated.add(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    return moments


def _solve_unit(spec: PermutationSpec, group: PermutationGroup, fibres: tuple[PermutationGroup, ...],
                moments: Mapping[str, list[CrossMoments]], kinds: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The transforms of one group and its within-head groups that activations show (none: ``{}``)."""
    observed = [f for f in fibres if moments[f.name]]
    if observed:
        return _solve_heads(group, observed, moments, kinds)
    if not group.active or not moments[group.name]:
        return {}
    if kinds[group.name] == "orthogonal":
        cost = sum(m.cross() for m in moments[group.name])
        return {group.name: procrustes(cost, group.fixes_ones)}
    return {group.name: best_assignment(sum(m.correlation() for m in moments[group.name]))}


def _solve_heads(heads: PermutationGroup, fibres: list[PermutationGroup], moments: Mapping[str, list[CrossMoments]],
                 kinds: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Heads assigned by their best within-head maps, then each head's maps (module docstring)."""
    count = heads.size
    score = torch.zeros(count, count, dtype=torch.float64)
    blocks: dict[str, torch.Tensor] = {}
    for fibre in fibres:
        orthogonal = kinds[fibre.name] == "orthogonal"
        total = sum(m.cross() if orthogonal else m.correlation() for m in moments[fibre.name])
        block = total.reshape(count, fibre.size, count, fibre.size).transpose(1, 2)  # (a, c, i, j)
        blocks[fibre.name] = block
        if orthogonal:
            score += torch.linalg.matrix_norm(block, ord="nuc")
        else:
            score += torch.tensor([[assignment_value(block[a, c]) for c in range(count)] for a in range(count)])
    order = best_assignment(score) if heads.active else torch.arange(count)
    transforms = {heads.name: order} if heads.active else {}
    for fibre in fibres:
        chosen = blocks[fibre.name][torch.arange(count), order]  # (a, i, j): A's head a against B's head order[a]
        if kinds[fibre.name] == "orthogonal":
            transforms[fibre.name] = torch.stack([procrustes(block, fibre.fixes_ones) for block in chosen])
        else:
            transforms[fibre.name] = torch.stack([best_assignment(block.clone()) for block in chosen])
    return transforms


def _weight_objective(spec: PermutationSpec, state_dict_a: Mapping[str, torch.Tensor],
                      state_dict_b: Mapping[str, torch.Tensor]) -> float:
    """``sum <W_A, W_B>_F`` over the cost tensors the spec moves, in float64."""
    return sum(float(torch.dot(state_dict_a[p].flatten().to(torch.float64), state_dict_b[p].flatten().to(torch.float64)))
               for p in spec.members_by_param if is_cost_tensor(p, state_dict_a[p]))
