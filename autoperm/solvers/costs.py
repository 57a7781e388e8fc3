"""The cost products of weight matching, cached across group visits (Git Re-Basin, arXiv 2209.04836).

A member's contribution ``A_m @ B_m'^T`` to its group's cost depends only on the permutations
of the *other* groups touching the same tensor, so each contribution is cached with the
permutations it was made under and brought up to date (or recomputed) only when one of them has
changed. The inner products ``<A, pi(B)>`` of the objective are cached by the version counters
of the groups touching each tensor.

:class:`PermutationState` is the current point of a run (permutations and their versions);
:class:`CostCache` reads it and never changes it. Which groups to solve, and when, is the
coordinate-descent schedule's business (:mod:`autoperm.solvers.weight_matching`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from autoperm.spec import Member, PermutationGroup, PermutationSpec, layout_positions, member_matrix, permute_tensor
from autoperm.spec.apply import axis_index

__all__ = [
    "CostCache",
    "PermutationState",
    "cost_terms",
    "default_cache_bytes",
    "matrix_product",
    "product_dtype",
    "sliced_matrix_product",
]


@dataclass(frozen=True)
class _Term:
    """One member of a group that enters the cost, and the groups its product depends on."""

    group: PermutationGroup
    member: Member
    depends_on: tuple[str, ...]


class PermutationState:
    """The current permutations of a run, each with a version that changes whenever it does.

    A changed permutation is a new tensor (never modified in place), so cached products can
    tell by identity which permutations moved since they were made; every change gets a fresh
    version id, so a move taken back restores the old tensor and id and nothing is recomputed.
    """

    def __init__(self, perms: dict[str, torch.Tensor]):
        self.perms = perms
        self.versions = {name: 0 for name in perms}
        self.version_ids = itertools.count(1)

    def move(self, changed: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        """Take the permutations ``changed``; return what :meth:`restore` needs to take them back."""
        saved = {name: (self.perms[name], self.versions[name]) for name in changed}
        for name, permutation in changed.items():
            self.perms[name] = permutation
            self.versions[name] = next(self.version_ids)
        return saved

    def restore(self, saved: Mapping[str, tuple[torch.Tensor, int]]) -> None:
        """Take back a :meth:`move`."""
        for name, (permutation, version) in saved.items():
            self.perms[name], self.versions[name] = permutation, version

    def stamp(self, names: Iterable[str]) -> tuple[int, ...]:
        """The versions of ``names``: equal stamps mean none of them moved in between."""
        return tuple(self.versions[name] for name in names)


class CostCache:
    """Cost products and inner products of the cost tensors this process holds, kept up to date.

    Memory: besides the two state dicts (shared, not copied on the CPU), one float64 ``n x n``
    product per cost term whose permutation dependencies can change, one constant ``n x n`` sum
    per group, and temporary copies of one tensor (or, for tensors above ``_CHUNK_ELEMENTS``,
    of one slice) at a time, within ``budget`` bytes of cached products. A product above
    ``_CHUNK_ELEMENTS`` entries is made a block of rows at a time into its float64 sum.

    Args:
        spec: the permutation spec.
        state_dict_a, state_dict_b: the two models (or this rank's shards of them).
        cost_params: the names of the cost tensors held here, in the spec's order.
        state: the current permutations (read, never changed here).
        device: where the matmuls run.
        budget: the most bytes of cached products (``None``: :func:`default_cache_bytes`).
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_dict_a: Mapping[str, torch.Tensor],
        state_dict_b: Mapping[str, torch.Tensor],
        cost_params: Sequence[str],
        state: PermutationState,
        device: torch.device,
        budget: int | None = None,
    ):
        self.spec = spec
        self.state = state
        self.device = device
        self.cost_params = list(cost_params)
        self.a = {name: state_dict_a[name].detach().to(device) for name in self.cost_params}
        self.b = {name: state_dict_b[name].detach().to(device) for name in self.cost_params}
        self.terms = cost_terms(spec, self.cost_params)
        self.products: dict[tuple[str, int], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
        # Cached n x n products may not outgrow the cost tensors themselves (models with wide
        # groups and few weights, such as MobileNetV2): past this budget products are recomputed.
        weights = sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))
        self.cache_budget = default_cache_bytes(weights) if budget is None else budget
        self.cache_bytes = 0
        self.constants: dict[str, torch.Tensor | None] = {}
        self.inner_products: dict[str, tuple[tuple[int, ...], float]] = {}
        self.params_of: dict[str, tuple[str, ...]] = {}
        # tensors a group permutes separately per unit of another axis (per_axis): no gather index
        # per axis describes them, so B is permuted whole (they are small: stacked experts)
        self.along_units = {
            name for name in self.cost_params if any(m.per_axis is not None for _, m in spec.members_by_param[name])
        }
        for name in self.cost_params:
            for group, _ in spec.members_by_param[name]:
                if name not in self.params_of.setdefault(group.name, ()):
                    self.params_of[group.name] += (name,)

    @property
    def perms(self) -> dict[str, torch.Tensor]:
        return self.state.perms

    # ------------------------------------------------------------------ objective
    def objective(self) -> float:
        """``sum <A, pi(B)>`` over the cost tensors held here."""
        return sum(self.inner(name) for name in self.cost_params)

    def touched(self, groups: Iterable[str]) -> set[str]:
        """The cost tensors held here that ``groups`` permute."""
        return {param for name in groups for param in self.params_of.get(name, ())}

    def inner(self, name: str) -> float:
        """``<A, pi(B)>`` of one cost tensor, cached by the versions of the groups touching it."""
        key = tuple(self.state.versions.get(g.name, 0) for g, _ in self.spec.members_by_param[name])
        cached = self.inner_products.get(name)
        if (cached is None or cached[0] != key) and name in self.along_units:
            moved = permute_tensor(self.spec, self.perms, name, self.b[name])
            cached = (key, float(torch.sum(self.a[name].double() * moved.double())))
        elif cached is None or cached[0] != key:
            cached = (key, _inner_product(self.a[name], self.b[name], self._indices(name)))
            self.inner_products[name] = cached
        return cached[1]

    # ----------------------------------------------------------------------- cost
    def group_cost(self, group: PermutationGroup, waiting: AbstractSet[str] = frozenset()) -> np.ndarray | None:
        """``sum_m A_m @ B_m'^T`` over the members held here, as a float64 array (``(per, n, n)``
        for a fibred group), without the terms that depend on a group in ``waiting``; ``None``
        when no term is left."""
        fibred = group.per is not None
        terms = self.terms.get(group.name, [])
        left_out = {i for i, t in enumerate(terms) if not waiting.isdisjoint(t.depends_on)}
        if group.name in self.constants:
            constant = self.constants[group.name]
            total = None if constant is None else constant.clone()
        else:
            total = None
            for term in terms:
                if not term.depends_on:
                    total = self._accumulate(term, fibred, total)
            size = 0 if total is None else total.numel() * total.element_size()
            if self.cache_bytes + size <= self.cache_budget:
                self.constants[group.name] = None if total is None else total.clone()
                self.cache_bytes += size
        for index, term in enumerate(terms):
            if not term.depends_on or index in left_out:
                continue
            key = (group.name, index)
            cached = self.products.get(key)
            size = 8 * group.size ** 2 * (self.spec[group.per].size if fibred else 1) if cached is None else 0
            if cached is None and self.cache_bytes + size > self.cache_budget:
                # not cached: added to the float64 total a block of rows at a time
                total = self._accumulate(term, fibred, total)
                continue
            product = self._accumulate(term, fibred, None) if cached is None else self._refresh(term, *cached)
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
            or name in self.along_units
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
        dtype = product_dtype(b.dtype)
        difference = _gather(b.index_select(other.axis, sources_new), gather).to(dtype)
        difference.sub_(_gather(b.index_select(other.axis, sources_old), gather))
        a_part = member_matrix(self.a[name].index_select(other.axis, targets), member, group.size)
        return product.add_(matrix_product(a_part, member_matrix(difference, member, group.size)).double())

    def _accumulate(self, term: _Term, fibred: bool, total: torch.Tensor | None) -> torch.Tensor:
        """``total + A_m @ B_m'^T`` in float64, in place (a new tensor when ``total`` is ``None``).

        A product of more than ``_CHUNK_ELEMENTS`` entries of a plain member is made a block of
        rows at a time, each block computed exactly as its rows of the whole product would be (the
        same slices, in the same order) and added to the float64 total as soon as it is made: no
        ``n x n`` product in :func:`product_dtype` is held beside the float64 total (95 MB for a
        0.5B-parameter model's MLP group in float32).
        """
        member, size = term.member, term.group.size
        rows = self.a[member.param].shape[member.axis] if member.is_plain else 0
        if fibred or rows != size or size * size <= _CHUNK_ELEMENTS or member.param in self.along_units:
            product = self._product(term, fibred, total is None)
            return product if total is None else total.add_(product)
        if total is None:
            total = torch.zeros(size, size, dtype=torch.float64, device=self.device)
        block = max(1, _CHUNK_ELEMENTS // size)
        for start in range(0, size, block):
            length = min(block, size - start)
            total.narrow(0, start, length).add_(self._product(term, False, False, start, length))
        return total

    def _product(
        self, term: _Term, fibred: bool, double: bool = True, start: int = 0, length: int | None = None
    ) -> torch.Tensor:
        """``A_m @ B_m'^T`` from scratch, in float64 (``double=False``: in :func:`product_dtype`, to
        be added to a float64 sum without a float64 copy).

        A tensor above ``_CHUNK_ELEMENTS`` is multiplied a slice at a time, unless it is already
        in the product's dtype and both matrices are views of it (no copy at all). ``start`` and
        ``length`` (a plain member only) ask for those rows of the product alone.
        """
        name, member, size = term.member.param, term.member, term.group.size
        a, b = self.a[name], self.b[name]
        if name in self.along_units:
            product = matrix_product(member_matrix(a, member, size, fibred), self._moved(term))
            return product.double() if double else product
        indices = self._indices(name, term.group, member)
        split = _chunks(a, member.axis)
        views = not indices and not fibred and member.is_plain and a.shape[member.axis] == size
        in_place = a.dtype == b.dtype == product_dtype(a.dtype)
        rows = size if length is None else length
        a_rows = a if length is None else a.narrow(member.axis, start, length)
        if split is not None and not (views and in_place and (member.axis == 0 or a.dim() == 2)):
            product = _split_product(a_rows, b, indices, member, size, fibred, *split, a_size=rows)
        else:
            a_matrix = member_matrix(a_rows, member, rows, fibred)
            product = matrix_product(a_matrix, _gathered_matrix(b, indices, member, size, fibred))
        return product.double() if double else product

    def _moved(self, term: _Term) -> torch.Tensor:
        """The member matrix of B's entry, permuted by every group but the term's own (whose other
        members in the tensor still move, as in :meth:`_indices`), for a tensor in ``along_units``."""
        name, group, member = term.member.param, term.group, term.member
        moved = permute_tensor(self.spec, self.perms, name, self.b[name], skip={group.name})
        if group.per is None:
            for g, other in self.spec.members_by_param[name]:
                if g.name == group.name and other is not member:
                    index = axis_index(self.spec, [(g, other)], self.perms, moved.shape[other.axis])
                    assert index is not None
                    moved = moved.index_select(other.axis, index.to(moved.device))
        return member_matrix(moved, member, group.size, group.per is not None)

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



_CACHE_FLOOR = 64 << 20
"""The default product cache is the pair's size up to this, and a sixteenth of it beyond."""


def default_cache_bytes(weights: int) -> int:
    """The default budget for cached cost products, given the bytes of the two models' cost tensors.

    Small models cache every product (they are revisited often, and cheap to keep); large ones
    keep a sixteenth of their size (at least ``_CACHE_FLOOR``), so that a pair's peak memory
    stays near its own size (``benchmarks/README.md``): at that size products are rarely reused
    (a sweep after the first re-solves only the groups whose neighbours moved, and recomputes
    their products), and one MLP product of a 0.5B-parameter model (189 MB in float64 at
    n = 4864) already outgrows a budget meant for many small ones.
    """
    return min(weights, max(_CACHE_FLOOR, weights // 16))


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype cost products of tensors of ``dtype`` are computed and summed in: float32 for
    bfloat16 and float16 tensors (a half-precision matmul rounds every entry of its result, and
    every partial sum over slices, to 8 or 11 bits), the tensors' own dtype otherwise.

    Example:
        >>> product_dtype(torch.bfloat16), product_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def matrix_product(a_matrix: torch.Tensor, b_matrix: torch.Tensor) -> torch.Tensor:
    """``a_matrix @ b_matrix.mT`` in :func:`product_dtype` (batched for 3-d matrices).

    Half-precision matrices are cast first, so callers pass matrices of one tensor (or one slice)
    at a time; :func:`_matmul_precision` keeps bfloat16 data on the CPU's bfloat16 units.

    Example:
        >>> matrix_product(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 3, dtype=torch.bfloat16)).dtype
        torch.float32
    """
    dtype = product_dtype(torch.promote_types(a_matrix.dtype, b_matrix.dtype))
    with _matmul_precision(a_matrix.dtype, b_matrix.dtype):
        return a_matrix.to(dtype) @ b_matrix.to(dtype).mT


def sliced_matrix_product(a_matrix: torch.Tensor, b_matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a_matrix @ b_matrix.T`` in ``dtype`` for 2-d matrices, casting a slice of columns at a time.

    Neither matrix is ever copied whole into ``dtype``: at most ``_CHUNK_ELEMENTS`` of each are
    cast at once, and the slices' products accumulate in ``dtype`` (bfloat16 data on the CPU's
    bfloat16 units, as in :func:`matrix_product`). The result holds ``rows_a x rows_b`` entries.

    Example:
        >>> a, b = torch.ones(2, 3, dtype=torch.float16), torch.ones(4, 3, dtype=torch.float16)
        >>> sliced_matrix_product(a, b, torch.float32).tolist()[0]
        [3.0, 3.0, 3.0, 3.0]
    """
    rows, columns = a_matrix.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, rows, b_matrix.shape[0]))
    total = torch.zeros(rows, b_matrix.shape[0], dtype=dtype, device=a_matrix.device)
    with _matmul_precision(a_matrix.dtype, b_matrix.dtype):
        for start in range(0, columns, step):
            length = min(step, columns - start)
            a_part = a_matrix.narrow(1, start, length).to(dtype)
            b_part = b_matrix.narrow(1, start, length).to(dtype)
            total.addmm_(a_part, b_part.T)
    return total


@contextmanager
def _matmul_precision(a_dtype: torch.dtype, b_dtype: torch.dtype) -> Iterator[None]:
    """Float32 matmuls of bfloat16 data on the CPU's bfloat16 units, within this block.

    oneDNN may round float32 matmul inputs to bfloat16 and accumulate in float32
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). For inputs that are bfloat16
    values cast to float32 the rounding changes nothing, so the result is the float32 product,
    about twice as fast where the CPU has bfloat16 matrix units. Other dtypes, and torch builds
    without the setting, run as they are. The setting is process-wide while the block runs.
    """
    settings = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if a_dtype != torch.bfloat16 or b_dtype != torch.bfloat16 or not hasattr(settings, "fp32_precision"):
        yield
        return
    before = settings.fp32_precision
    settings.fp32_precision = "bf16"
    try:
        yield
    finally:
        settings.fp32_precision = before


_CHUNK_ELEMENTS = 1 << 22
"""Most elements of a tensor gathered at once (16 MiB in float32): bounds the temporary memory."""


_INNER_CHUNK_ELEMENTS = 1 << 18
"""Most elements of a float64 slice of an inner product (2 MiB): small buffers, reused by the allocator
rather than mapped afresh for every slice (an inner product is taken of every tensor a move touches)."""


def _chunks(tensor: torch.Tensor, keep_axis: int | None, limit: int | None = None) -> tuple[int, int] | None:
    """An axis other than ``keep_axis`` to slice ``tensor`` along, and the slice length, for slices of
    at most ``limit`` elements (default ``_CHUNK_ELEMENTS``); ``None`` if small."""
    limit = _CHUNK_ELEMENTS if limit is None else limit
    axes = [axis for axis in range(tensor.dim()) if axis != keep_axis]
    if tensor.numel() <= limit or not axes:
        return None
    axis = max(axes, key=lambda a: tensor.shape[a])
    return axis, max(1, limit * tensor.shape[axis] // tensor.numel())


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
    a_size: int | None = None,
) -> torch.Tensor:
    """``M(A) @ M(B')^T`` in :func:`product_dtype`, summing slices of ``step`` along ``axis`` (not the member's).

    ``M`` is the member matrix and ``B'`` = ``b`` gathered by ``indices``. The slices accumulate in
    the product's dtype, as one matmul would, and no slice holds more than ``_CHUNK_ELEMENTS``
    (half-precision slices are cast one at a time, never the whole tensor). ``a_size``: the rows of
    ``M(A)`` when ``a`` is a block of a plain member's rows (default ``size``).
    """
    a_size = size if a_size is None else a_size
    dtype = product_dtype(torch.promote_types(a.dtype, b.dtype))
    total: torch.Tensor | None = None
    for start in range(0, a.shape[axis], step):
        length = min(step, a.shape[axis] - start)
        a_part = member_matrix(a.narrow(axis, start, length), member, a_size, fibred).to(dtype)
        b_part = _gathered_matrix(b, indices, member, size, fibred, axis, start, length).to(dtype)
        with _matmul_precision(a.dtype, b.dtype):
            if total is None:
                total = a_part @ b_part.mT
            elif fibred:
                total.baddbmm_(a_part, b_part.mT)
            else:
                total.addmm_(a_part, b_part.mT)
    assert total is not None
    return total


def _inner_product(a: torch.Tensor, b: torch.Tensor, indices: Mapping[int, torch.Tensor]) -> float:
    """``<A, B'>`` in float64, ``B'`` = ``b`` gathered by ``indices``, a slice of at most
    ``_INNER_CHUNK_ELEMENTS`` at a time."""
    split = _chunks(a, None, _INNER_CHUNK_ELEMENTS)
    if split is None:
        return float(torch.sum(a.double() * _gather(b, indices).double()))
    axis, step = split
    total = 0.0
    for start in range(0, a.shape[axis], step):
        length = min(step, a.shape[axis] - start)
        part = _gather(b, indices, axis, start, length).to(torch.float64, copy=True)
        total += float(torch.sum(part.mul_(a.narrow(axis, start, length))))
    return total


def cost_terms(spec: PermutationSpec, cost_params: Sequence[str]) -> dict[str, list[_Term]]:
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


