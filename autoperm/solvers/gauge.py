"""Balanced gauges: a canonical representative of each invertible and scale group's orbit.

An invertible group moves the axes that write its activation (role ``"out"``) by ``T`` and those
that read it (role ``"in"``) by ``T^-T``, so the Gram matrices ``G_out = sum X X^T`` of the
writers and ``G_in = sum Y Y^T`` of the readers move to ``T G_out T^T`` and ``T^-T G_in T^-1``.
The *balanced* gauge makes both equal to one diagonal matrix ``S`` (the square roots of the
eigenvalues of ``G_out G_in``): with ``G_out = L L^T`` and ``L^T G_in L = U S^2 U^T``,
``T = S^(1/2) U^T L^-1`` (Laub et al., "Computation of system balancing transformations", IEEE
TAC 1987; for a head's value-output circuit ``W_O W_V`` it is the SVD split ``U S^(1/2), S^(1/2) V^T``).
It is unique up to the orthogonal maps that commute with ``S``, so two models brought to it
differ, in these groups, by an orthogonal map that generalised weight matching can find.
Scale groups (positive scales through ReLU) take the diagonal version: each unit's writers and
readers get equal norms.

A balanced transform is an element of the group, so ``B`` and its balanced form compute the same
function, and a model interpolated in balanced coordinates computes the same function as the
interpolation mapped back by ``S_A^-1`` (:func:`invert`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from autoperm.spec import Member, PermutationSpec
from autoperm.spec.apply import layout_positions, member_matrix

__all__ = ["balancing_transforms", "invert"]

logger = logging.getLogger(__name__)

_RELATIVE_FLOOR = 1e-10
"""Gram matrices are regularised by this times their mean diagonal before the Cholesky factor."""


def balancing_transforms(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The balancing transform of every active invertible and scale group whose members all have roles.

    Args:
        spec: the spec (use a canonical one so that norms do not cut the groups).
        state_dict: the model's state dict (not modified).

    Returns:
        ``{group name: transform}``: float64 matrices (stacked per head for fibred groups) for
        invertible groups, positive scale vectors for scale groups. Groups that are left out
        (a member without a role, writers or readers missing) keep the identity.

    Example:
        >>> balanced = apply_transform(spec, balancing_transforms(spec, sd), sd)
    """
    transforms: dict[str, torch.Tensor] = {}
    for group in spec.active_groups:
        if group.kind not in ("invertible", "scale"):
            continue
        members = [m for m in group.members if m.param in state_dict and state_dict[m.param].is_floating_point()]
        writers = [m for m in members if m.role == "out"]
        readers = [m for m in members if m.role == "in"]
        if not writers or not readers or len(writers) + len(readers) != len(members):
            logger.info("group %r: not balanced (it needs roles on every member, with writers and readers)", group.name)
            continue
        heads = spec[group.per].size if group.per is not None else None
        gram_out = sum(_gram(state_dict[m.param], m, group.size, heads) for m in writers)
        gram_in = sum(_gram(state_dict[m.param], m, group.size, heads) for m in readers)
        if group.kind == "scale":
            out_norms = torch.diagonal(gram_out, dim1=-2, dim2=-1).sqrt()
            in_norms = torch.diagonal(gram_in, dim1=-2, dim2=-1).sqrt()
            usable = (out_norms > 0) & (in_norms > 0)
            ratio = torch.where(usable, in_norms / out_norms.where(usable, torch.ones_like(out_norms)), torch.ones_like(out_norms))
            transforms[group.name] = ratio.sqrt()
        else:
            transforms[group.name] = _balance(gram_out, gram_in)
    return transforms


def invert(spec: PermutationSpec, transforms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of each transform of :func:`balancing_transforms` (``1 / d`` for scales, ``T^-1`` for matrices)."""
    return {name: t.reciprocal() if spec[name].kind == "scale" else torch.linalg.inv(t) for name, t in transforms.items()}


def _gram(tensor: torch.Tensor, member: Member, size: int, heads: int | None) -> torch.Tensor:
    """``X X^T`` of the member's entries, ``(size, size)``, or ``(heads, size, size)`` for a fibred group."""
    if heads is not None and member.per_axis is not None:  # the heads run along another axis (stacked experts)
        rows = member_matrix(tensor.to(torch.float64), member, size, fibred=True)
        return rows @ rows.transpose(-1, -2)
    positions = layout_positions(member, size)
    moved = tensor.movedim(member.axis, 0).to(torch.float64)
    block = moved[positions.flatten()].reshape(*positions.shape, -1)  # (*outer, size, inner, rest)
    if heads is None:
        rows = block.movedim(-3, 0).reshape(size, -1)
        return rows @ rows.T
    rows = block.reshape(heads, -1, *block.shape[-3:]).movedim(2, 1).reshape(heads, size, -1)
    return rows @ rows.transpose(-1, -2)


def _balance(gram_out: torch.Tensor, gram_in: torch.Tensor) -> torch.Tensor:
    """``T = S^(1/2) U^T L^-1`` (see the module docstring), for one Gram pair or a stack of them."""
    size = gram_out.shape[-1]
    eye = torch.eye(size, dtype=torch.float64)

    def regularised(gram: torch.Tensor) -> torch.Tensor:
        scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
        return gram + _RELATIVE_FLOOR * scale[..., None, None] * eye

    lower = torch.linalg.cholesky(regularised(gram_out))
    middle = lower.transpose(-1, -2) @ regularised(gram_in) @ lower
    values, vectors = torch.linalg.eigh((middle + middle.transpose(-1, -2)) / 2)
    values, order = values.flip(-1).clamp_min(0), torch.arange(size - 1, -1, -1)
    vectors = vectors[..., order]  # largest first, so that balanced units come in a fixed order
    root = values.sqrt().sqrt()  # S^(1/2), S = sqrt(eigenvalues)
    root = torch.maximum(root, _RELATIVE_FLOOR * root.amax(-1, keepdim=True).clamp_min(1e-300))  # keep T invertible
    return (root[..., :, None] * vectors.transpose(-1, -2)) @ torch.linalg.inv(lower)
