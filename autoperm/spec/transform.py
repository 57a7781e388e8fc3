"""Applying transforms of every kind (permutations, scales, orthogonal and invertible maps) to state dicts.

A transform of a group is one of:

- a LongTensor ``(size,)``: a permutation, applied as :func:`autoperm.spec.apply_permutation` does;
- a positive float vector ``(size,)``: the scale ``diag(d)`` (groups of kind ``scale`` or ``invertible``);
- a float matrix ``(size, size)``: ``T`` (orthogonal for ``orthogonal`` groups, any invertible
  matrix for ``invertible`` ones).

A fibred group (``per`` set) takes one of these per index of its ``per`` group, stacked first.
Along each member's positions ``new[i] = sum_j M[i, j] old[j]`` with ``M = T`` for members of
role ``"out"`` (and role-free kinds) and ``M = T^-T`` for role ``"in"``; the sums run in float64
and the result is cast back to the tensor's dtype.

A group with ``fixes_ones`` (a stream read by LayerNorms without gain) admits only the maps with
``T 1 = 1``: :func:`random_transform` draws them as ``H diag(1, Q') H^T``, where ``H`` is an
orthonormal basis whose first column is ``1 / sqrt(n)``, and :func:`check_transforms` rejects
the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from autoperm.errors import SpecError
from autoperm.spec.apply import axis_index, check_permutations, layout_positions, permute_along_units
from autoperm.spec.kinds import KINDS, admitted, largest
from autoperm.spec.schema import Member, PermutationGroup, PermutationSpec

__all__ = ["Transforms", "apply_transform", "random_transform", "transform_kind", "check_transforms", "ones_basis"]

Transforms = dict[str, torch.Tensor]
"""Group name -> permutation (LongTensor), positive scale vector or float matrix (see the module docstring)."""

ORTHOGONAL_TOLERANCE = 1e-6
"""Largest ``|T T^T - I|`` entry accepted as orthogonal (float64 products of float32 maps stay near 1e-7)."""


def transform_kind(spec: PermutationSpec, group: PermutationGroup, transform: torch.Tensor) -> str:
    """The kind a transform of ``group`` belongs to: ``permutation``, ``scale``, ``orthogonal`` or ``invertible``.

    Raises:
        SpecError: the tensor has the wrong shape for the group, or a scale is not positive.
    """
    per = spec[group.per].size if group.per is not None else None
    lead = () if per is None else (per,)
    shape = tuple(transform.shape)
    if not transform.is_floating_point():
        return "permutation"
    if shape == (*lead, group.size):
        if not bool((transform > 0).all()):
            raise SpecError(f"the scale of group {group.name!r} has entries <= 0; scales must be positive")
        return "scale"
    if shape != (*lead, group.size, group.size):
        raise SpecError(
            f"the transform of group {group.name!r} has shape {list(shape)}; expected {list((*lead, group.size))} "
            f"(a permutation or positive scale) or {list((*lead, group.size, group.size))} (a matrix)"
        )
    matrix = transform.to(torch.float64)
    gram = matrix @ matrix.transpose(-1, -2)
    if (gram - torch.eye(group.size, dtype=torch.float64)).abs().max().item() <= ORTHOGONAL_TOLERANCE:
        return "orthogonal"
    return "invertible"


def check_transforms(spec: PermutationSpec, transforms: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each transform's kind, after checking that its group admits it.

    Returns:
        ``{group name: kind of its transform}``.

    Raises:
        SpecError: an unknown group, a malformed transform, or a kind the group does not admit
            (the message names the group and both kinds).
    """
    kinds: dict[str, str] = {}
    permutations = {name: t for name, t in transforms.items() if not t.is_floating_point()}
    check_permutations(spec, permutations)
    for name, transform in transforms.items():
        if name not in spec.group_by_name:
            raise SpecError(f"transform given for unknown group {name!r}")
        group = spec[name]
        kind = transform_kind(spec, group, transform)
        if kind not in admitted(group.kind):
            raise SpecError(
                f"group {name!r} is of kind {group.kind!r} and does not admit {kind} transforms; "
                "give a transform of its kind, or run `autoperm verify` on a spec that declares a larger kind"
            )
        if kind == "invertible" and not bool(torch.isfinite(torch.linalg.cond(transform.to(torch.float64))).all()):
            raise SpecError(f"the matrix of group {name!r} is singular")
        if group.fixes_ones and kind != "permutation":
            _check_fixes_ones(group, transform, kind)
        kinds[name] = kind
    return kinds


def _check_fixes_ones(group: PermutationGroup, transform: torch.Tensor, kind: str) -> None:
    """Raise unless ``transform`` (a scale or a matrix, per head when stacked) maps the all-ones vector onto itself."""
    values = transform.to(torch.float64)
    image = values if kind == "scale" else values @ torch.ones(group.size, dtype=torch.float64)
    error = (image - 1).abs().max().item()
    if error > ORTHOGONAL_TOLERANCE * max(1.0, group.size ** 0.5):
        raise SpecError(
            f"group {group.name!r} admits only transforms that fix the all-ones vector (T 1 = 1: a LayerNorm "
            f"reads it), but its {kind} transform moves it by up to {error:.3g}; draw it with random_transform"
        )


def apply_transform(
    spec: PermutationSpec,
    transforms: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Transform a state dict: every member of every group moves by its group's transform.

    Generalises :func:`autoperm.spec.apply_permutation` (which it equals when every transform
    is a permutation) to scales, orthogonal and invertible maps: members of role ``"out"`` move
    by ``T``, members of role ``"in"`` by ``T^-T``. Groups are applied in the order of
    :attr:`PermutationSpec.members_by_param` (fibred groups after the groups they are fibred over).

    Args:
        spec: the spec; each group's ``kind`` bounds the transforms it accepts.
        transforms: ``{group name: transform}`` (see :mod:`autoperm.spec.transform`); groups
            left out stay put.
        state_dict: the state dict to transform; it is not modified.

    Returns:
        A new dict with the same keys; entries no transform touches are the same tensor objects.

    Raises:
        SpecError: unknown groups, malformed transforms, a kind the group does not admit, a
            state dict that lacks a member, or a non-floating tensor under a non-permutation.

    Example:
        >>> transformed = apply_transform(spec, random_transform(spec, seed=0), model.state_dict())
    """
    kinds = check_transforms(spec, transforms)
    missing = [name for name in spec.members_by_param if name not in state_dict]
    if missing:
        raise SpecError(f"the state dict lacks {len(missing)} tensor(s) the spec transforms, e.g. {missing[:3]}")
    result = dict(state_dict)
    for name, pairs in spec.members_by_param.items():
        tensor = state_dict[name]
        moved = tensor
        for group, member in pairs:
            transform = transforms.get(group.name)
            if transform is None:
                continue
            if kinds[group.name] == "permutation" and member.per_axis is not None:
                moved = permute_along_units(moved, member, group.size, transform)
                continue
            if kinds[group.name] == "permutation":
                index = axis_index(spec, [(group, member)], {group.name: transform}, moved.shape[member.axis])
                moved = moved.index_select(member.axis, index.to(moved.device))
                continue
            if not tensor.is_floating_point():
                raise SpecError(f"{name!r} ({tensor.dtype}) cannot take the {kinds[group.name]} transform of group {group.name!r}")
            moved = _transform_member(moved, member, group.size, _member_matrix(transform, group.size, member.role, kinds[group.name]),
                                      fibred=group.per is not None)
        if moved is not tensor:
            result[name] = moved.to(tensor.dtype)
    return result


def _member_matrix(transform: torch.Tensor, size: int, role: str | None, kind: str) -> torch.Tensor:
    """The float64 matrix (or stack of matrices) a member of ``role`` moves by: ``T`` or ``T^-T``."""
    if kind == "scale":
        values = transform.to(torch.float64)
        return torch.diag_embed(values.reciprocal() if role == "in" else values)
    matrix = transform.to(torch.float64)
    if role == "in" and kind == "invertible":
        return torch.linalg.inv(matrix).transpose(-1, -2)
    return matrix


def _transform_member(tensor: torch.Tensor, member: Member, size: int, matrix: torch.Tensor, fibred: bool) -> torch.Tensor:
    """``tensor`` with ``new[i] = sum_j matrix[i, j] old[j]`` along the member's positions (per head when ``fibred``)."""
    if fibred and member.per_axis is not None:  # stacked units on another axis: one matrix per slice
        stacked = tensor.movedim((member.per_axis, member.axis), (0, 1)).to(torch.float64)
        positions = layout_positions(member, size).flatten().to(stacked.device)
        block = stacked[:, positions].reshape(stacked.shape[0], -1, size, member.inner, *stacked.shape[2:])
        updated = torch.einsum("eij,emjs...->emis...", matrix.to(stacked.device), block)
        result = stacked.clone()
        result[:, positions] = updated.reshape(stacked.shape[0], positions.numel(), *stacked.shape[2:])
        return result.movedim((0, 1), (member.per_axis, member.axis))
    moved = tensor.movedim(member.axis, 0).to(torch.float64)
    positions = layout_positions(member, size)  # (*outer counts, size, inner)
    flat = positions.flatten().to(moved.device)
    block = moved[flat].reshape(*positions.shape, -1)  # (*outer, size, inner, rest)
    matrix = matrix.to(moved.device)
    if fibred:
        heads = positions.shape[0]
        middle = block.reshape(heads, -1, size, block.shape[-2], block.shape[-1])
        updated = torch.einsum("hij,hmjsr->hmisr", matrix, middle).reshape(block.shape)
    else:
        updated = torch.einsum("ij,...jsr->...isr", matrix, block)
    result = moved.clone()
    result[flat] = updated.reshape(flat.numel(), *moved.shape[1:])
    return result.movedim(0, member.axis)


def _haar_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix: QR of a Gaussian matrix with the signs of R's diagonal fixed (Mezzadri, arXiv math-ph/0609050)."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(size, dtype=torch.float64))


def ones_basis(size: int) -> torch.Tensor:
    """An orthonormal basis ``H`` (float64, symmetric) whose first column is ``1 / sqrt(size)``.

    The Householder reflection that swaps ``e_1`` and ``1 / sqrt(size)``; the maps that fix the
    all-ones vector are ``H diag(1, M) H^T`` for any ``M`` of size ``size - 1``.
    """
    target = torch.full((size,), size ** -0.5, dtype=torch.float64)
    direction = torch.zeros(size, dtype=torch.float64)
    direction[0] = 1.0
    direction -= target
    norm = direction.dot(direction)
    if norm.item() < 1e-24:  # size 1: e_1 already is the normalised ones vector
        return torch.eye(size, dtype=torch.float64)
    return torch.eye(size, dtype=torch.float64) - 2 * torch.outer(direction, direction) / norm


def _draw(kind: str, size: int, generator: torch.Generator, fixes_ones: bool = False) -> torch.Tensor:
    if kind == "permutation":
        return torch.randperm(size, generator=generator)
    if fixes_ones:  # scales that fix ones are the identity; matrices act on the complement of ones only
        if kind == "scale" or size == 1:
            return torch.randperm(size, generator=generator)
        basis = ones_basis(size)
        inner = torch.eye(size, dtype=torch.float64)
        inner[1:, 1:] = _draw(kind, size - 1, generator)
        return basis @ inner @ basis.T
    if kind == "scale":
        return torch.exp(torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1)
    if kind == "orthogonal":
        return _haar_orthogonal(size, generator)
    spread = torch.exp(torch.rand(size, generator=generator, dtype=torch.float64) - 0.5)  # condition number below e
    return _haar_orthogonal(size, generator) @ torch.diag(spread) @ _haar_orthogonal(size, generator)


def random_transform(spec: PermutationSpec, seed: int | None = None, kinds: Iterable[str] | None = None) -> Transforms:
    """Draw a random transform of each active group's kind.

    Permutations are uniform; scales are ``exp(U(-1, 1))``; orthogonal maps are Haar-random
    (QR with the sign fix); invertible maps are ``Q1 diag(exp(U(-0.5, 0.5))) Q2`` with Haar
    ``Q1, Q2`` (condition number below ``e``). Groups with ``fixes_ones`` draw ``H diag(1, M) H^T``
    with ``M`` of the kind one size smaller and ``H`` from :func:`ones_basis` (for orthogonal
    groups: Haar-random among the orthogonal maps that fix ``1``). Everything but permutations
    is float64.

    Args:
        spec: the spec.
        seed: seed of a private ``torch.Generator`` (the global RNG is left alone).
        kinds: the kinds that may be drawn (default: all); each group draws the largest of
            them it admits, so ``kinds=["permutation"]`` gives :func:`random_permutation`'s kind.

    Returns:
        ``{group name: transform}``; fibred groups get one per index of their ``per`` group.

    Raises:
        SpecError: ``kinds`` names an unknown kind.
    """
    allowed = set(KINDS if kinds is None else kinds)
    unknown = allowed - set(KINDS)
    if unknown:
        raise SpecError(f"unknown kinds {sorted(unknown)}; choose from {list(KINDS)}")
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    drawn: Transforms = {}
    for group in spec.active_groups:
        kind = largest(admitted(group.kind) & (allowed | {"permutation"}))
        count = spec[group.per].size if group.per is not None else None
        items = [_draw(kind, group.size, generator, group.fixes_ones) for _ in range(count or 1)]
        drawn[group.name] = torch.stack(items) if count is not None else items[0]
    return drawn
