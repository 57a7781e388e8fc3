"""Applying permutations described by a spec to state dicts and single tensors.

Convention: applying permutation ``p`` along an axis means ``new[i] = old[p[i]]``. A member
with a layout moves whole blocks of positions (see :mod:`autoperm.spec.schema`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from autoperm.errors import SpecError
from autoperm.spec.schema import Layout, Member, PermutationGroup, PermutationSpec

__all__ = [
    "Permutations",
    "random_permutation",
    "identity_permutation",
    "apply_permutation",
    "permute_tensor",
    "invert_permutation",
    "compose_permutations",
    "check_permutations",
    "axis_index",
    "layout_positions",
    "member_matrix",
    "per_axis_of",
    "permute_along_units",
]

Permutations = dict[str, torch.Tensor]
"""Group name -> LongTensor of shape ``(size,)`` (or ``(per_size, size)`` for a fibred group)."""


def _perm_shape(spec: PermutationSpec, group: PermutationGroup) -> tuple[int, ...]:
    if group.per is None:
        return (group.size,)
    return (spec[group.per].size, group.size)


def random_permutation(spec: PermutationSpec, seed: int | None = None) -> Permutations:
    """Draw a uniformly random permutation for every active group of ``spec``.

    Args:
        spec: the permutation spec.
        seed: seed of a private ``torch.Generator`` (the global RNG is left alone).

    Returns:
        ``{group name: LongTensor}``; fibred groups get one row per index of their ``per`` group.

    Example:
        >>> perms = random_permutation(spec, seed=0)
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    perms: Permutations = {}
    for group in spec.active_groups:
        shape = _perm_shape(spec, group)
        rows = [torch.randperm(group.size, generator=generator) for _ in range(shape[0] if len(shape) == 2 else 1)]
        perms[group.name] = torch.stack(rows) if len(shape) == 2 else rows[0]
    return perms


def identity_permutation(spec: PermutationSpec) -> Permutations:
    """The identity permutation for every active group."""
    perms: Permutations = {}
    for group in spec.active_groups:
        shape = _perm_shape(spec, group)
        perms[group.name] = torch.arange(group.size).expand(shape).clone()
    return perms


def invert_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> Permutations:
    """Permutations that undo ``perms`` (``apply(inverse, apply(perms, sd)) == sd``).

    For a fibred group, the row of head ``h`` of the inverse belongs to head ``h`` of the
    permuted model, i.e. to head ``perms[per][h]`` of the original.
    """
    inverse: Permutations = {}
    for group in spec.active_groups:
        if group.name not in perms:
            continue
        p = perms[group.name]
        if group.per is None:
            inverse[group.name] = torch.argsort(p)
        else:
            inverse_rows = torch.argsort(p, dim=-1)
            head_inverse = torch.argsort(perms[group.per]) if group.per in perms else torch.arange(p.shape[0])
            inverse[group.name] = inverse_rows[head_inverse]
    return inverse


def compose_permutations(
    spec: PermutationSpec, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]
) -> Permutations:
    """Permutations equal to applying ``first`` and then ``second`` (plain groups only)."""
    result: Permutations = {}
    for group in spec.active_groups:
        p1 = first.get(group.name)
        p2 = second.get(group.name)
        if group.per is not None and p1 is not None and p2 is not None:
            head2 = second.get(group.per, torch.arange(p2.shape[0]))
            result[group.name] = torch.gather(p1[head2], 1, p2)
        elif p1 is not None and p2 is not None:
            result[group.name] = p1[p2]
        elif p1 is not None or p2 is not None:
            result[group.name] = p1 if p1 is not None else p2
    return result


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`SpecError` if ``perms`` names unknown groups or holds non-permutations."""
    for name, p in perms.items():
        if name not in spec.group_by_name:
            raise SpecError(f"permutation given for unknown group {name!r}")
        group = spec[name]
        expected = _perm_shape(spec, group)
        if tuple(p.shape) != expected:
            raise SpecError(f"permutation of group {name!r} has shape {list(p.shape)}, expected {list(expected)}")
        rows = p.reshape(-1, group.size)
        sorted_rows = torch.sort(rows.to(torch.long), dim=-1).values
        if not torch.equal(sorted_rows, torch.arange(group.size).expand_as(sorted_rows)):
            raise SpecError(f"permutation of group {name!r} is not a permutation of 0..{group.size - 1}")


def layout_positions(layout: Layout, size: int) -> torch.Tensor:
    """Axis positions of a layout: LongTensor of shape ``(*outer counts, size, inner)``."""
    positions = layout.offset + torch.arange(size)[:, None] * layout.inner + torch.arange(layout.inner)[None, :]
    for count, stride in reversed(layout.outer):
        positions = (torch.arange(count) * stride).view(count, *([1] * positions.dim())) + positions[None]
    return positions


def axis_index(
    spec: PermutationSpec,
    pairs: Iterable[tuple[PermutationGroup, Layout]],
    perms: Mapping[str, torch.Tensor],
    axis_size: int,
) -> torch.Tensor | None:
    """The gather index of one tensor axis under the (group, layout) pairs that touch it.

    ``tensor.index_select(axis, index)`` applies them all (fibred groups after the groups they
    are fibred over, as ``pairs`` lists them). Returns ``None`` when no pair has a permutation.
    """
    index: torch.Tensor | None = None
    for group, layout in pairs:
        if per_axis_of(layout) is not None:
            raise SpecError(f"group {group.name!r} permutes {getattr(layout, 'param', 'a tensor')!r} along axis "
                            f"{layout.axis} separately for each unit on another axis (per_axis); "
                            "one gather index per axis cannot describe it (use permute_tensor)")
        p = perms.get(group.name)
        if p is None:
            continue
        positions = layout_positions(layout, group.size)
        p = p.to(torch.long).cpu()
        if group.per is None:
            source = positions.index_select(-2, p)
        else:
            view = [p.shape[0]] + [1] * (positions.dim() - 3) + [group.size, 1]
            source = torch.gather(positions, -2, p.view(view).expand_as(positions))
        if index is None:
            index = torch.arange(axis_size)
        updated = index.clone()
        updated[positions.flatten()] = index[source.flatten()]
        index = updated
    return index


def permute_tensor(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    name: str,
    tensor: torch.Tensor,
    skip: Iterable[str] = (),
) -> torch.Tensor:
    """Return ``tensor`` (the state-dict entry ``name``) with every group of ``perms`` applied.

    Args:
        spec: the permutation spec.
        perms: ``{group name: permutation}``; groups left out are the identity.
        name: the state-dict name of ``tensor``.
        tensor: the tensor to permute; it is not modified.
        skip: groups to leave out (weight matching permutes all *other* axes this way).

    Returns:
        A new tensor, or ``tensor`` itself when no group touches it.
    """
    skipped = set(skip)
    by_axis: dict[int, list[tuple[PermutationGroup, Layout]]] = {}
    along_units: list[tuple[PermutationGroup, Member]] = []
    for group, member in spec.members_by_param.get(name, ()):
        if group.name in skipped or group.name not in perms:
            continue
        if member.per_axis is not None:
            along_units.append((group, member))
        else:
            by_axis.setdefault(member.axis, []).append((group, member))
    result = tensor
    for axis, pairs in by_axis.items():
        index = axis_index(spec, pairs, perms, tensor.shape[axis])
        if index is not None:
            result = result.index_select(axis, index.to(result.device))
    for group, member in along_units:  # after the groups they are fibred over (members_by_param's order)
        result = permute_along_units(result, member, group.size, perms[group.name])
    return result


def per_axis_of(layout: Layout) -> int | None:
    """The ``per_axis`` of a member (the axis its fibred group's parent units run along), else ``None``."""
    return layout.per_axis if isinstance(layout, Member) else None


def permute_along_units(tensor: torch.Tensor, member: Member, size: int, rows: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the slice at position ``e`` of ``member.per_axis`` permuted along ``member.axis``
    by ``rows[e]`` (a member whose fibred group's parent units run along another axis).

    Args:
        tensor: the tensor; it is not modified.
        member: a member with ``per_axis`` set.
        size: the size of the member's group.
        rows: LongTensor ``(units, size)``, one permutation per position of ``per_axis``.

    Returns:
        A new tensor of the same shape.
    """
    assert member.per_axis is not None
    units, length = tensor.shape[member.per_axis], tensor.shape[member.axis]
    positions = layout_positions(member, size)  # (*outer, size, inner)
    rows = rows.to(torch.long).cpu()
    view = [units] + [1] * (positions.dim() - 2) + [size, 1]
    expanded = positions.unsqueeze(0).expand(units, *positions.shape)
    source = torch.gather(expanded, -2, rows.view(view).expand_as(expanded))
    index = torch.arange(length).repeat(units, 1)  # (units, length): row e gathers slice e
    index.scatter_(1, expanded.reshape(units, -1), source.reshape(units, -1))
    moved = tensor.movedim((member.per_axis, member.axis), (0, 1))
    gather = index.to(moved.device).view(units, length, *([1] * (moved.dim() - 2))).expand_as(moved)
    return torch.gather(moved, 1, gather).movedim((0, 1), (member.per_axis, member.axis))


def apply_permutation(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Permute a state dict: every member of every group moves by that group's permutation.

    Args:
        spec: the permutation spec (from :func:`autoperm.infer_spec` or YAML).
        perms: ``{group name: LongTensor}``; groups not listed (and fixed groups) stay put.
        state_dict: the state dict to permute; it is not modified.

    Returns:
        A new dict with the same keys; entries no group touches are the same tensor objects.

    Raises:
        SpecError: unknown group names, wrong sizes, or a state dict that lacks a member.

    Example:
        >>> sd_b = apply_permutation(spec, random_permutation(spec, seed=0), model.state_dict())
    """
    check_permutations(spec, perms)
    missing = [name for name in spec.members_by_param if name not in state_dict]
    if missing:
        raise SpecError(
            f"the state dict lacks {len(missing)} tensor(s) the spec permutes, e.g. {missing[:3]}; "
            "was the spec made for another model?"
        )
    return {
        name: permute_tensor(spec, perms, name, tensor) if name in spec.members_by_param else tensor
        for name, tensor in state_dict.items()
    }


def member_matrix(tensor: torch.Tensor, layout: Layout, size: int, fibred: bool = False) -> torch.Tensor:
    """View the part of ``tensor`` that a member covers as a matrix with the group index first.

    Returns:
        ``(size, -1)``; with ``fibred=True`` (a member of a fibred group) ``(per_size, size, -1)``,
        the first outer loop of the layout giving the leading dimension, or for a member with a
        ``per_axis`` that axis.
    """
    per_axis = per_axis_of(layout)
    if fibred and per_axis is not None:
        moved = tensor.movedim((per_axis, layout.axis), (0, 1))
        positions = layout_positions(layout, size)
        gathered = moved[:, positions.flatten().to(moved.device)]
        counts = [count for count, _ in layout.outer]
        gathered = gathered.reshape(moved.shape[0], *counts, size, layout.inner, -1).movedim(-3, 1)
        return gathered.reshape(moved.shape[0], size, -1)
    moved = tensor.movedim(layout.axis, 0)
    if layout.is_plain and moved.shape[0] == size and not fibred:
        return moved.reshape(size, -1)
    positions = layout_positions(layout, size)
    gathered = moved[positions.flatten().to(moved.device)]
    counts = [count for count, _ in layout.outer]
    gathered = gathered.reshape(*counts, size, layout.inner, -1)
    if fibred:
        gathered = gathered.movedim(-3, 1)  # (per, size, other outer..., inner, rest)
        return gathered.reshape(counts[0], size, -1)
    return gathered.movedim(-3, 0).reshape(size, -1)
