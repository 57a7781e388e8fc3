"""Cost products made a block of rows at a time, and sliced products: the same numbers, less memory."""

from __future__ import annotations

import importlib

import pytest
import torch

from autoperm import random_permutation
from tests._specs import resnet20, resnet20_spec

costs = importlib.import_module("autoperm.solvers.costs")


def _cache(dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = resnet20(width=2)
    spec = resnet20_spec(model)
    sd_a = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd_b = {k: v.to(dtype) if v.is_floating_point() else v for k, v in resnet20(width=2).state_dict().items()}
    names = [n for n in spec.members_by_param if sd_a[n].is_floating_point() and "running" not in n]
    state = costs.PermutationState(random_permutation(spec, seed=seed + 1))
    return spec, costs.CostCache(spec, sd_a, sd_b, names, state, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_product_made_by_blocks_of_rows_equals_the_whole_product(dtype: torch.dtype, monkeypatch) -> None:
    """Every block of rows is computed with the same slices in the same order as the whole product,
    so the float64 cost is the same bit for bit (the solver's results do not change)."""
    monkeypatch.setattr(costs, "_CHUNK_ELEMENTS", 512)
    spec, cache = _cache(dtype)
    blocked = 0
    for group in spec.active_groups:
        for term in cache.terms.get(group.name, []):
            if group.per is not None or not term.member.is_plain:
                continue
            whole = cache._product(term, False)
            by_rows = cache._accumulate(term, False, None)
            blocked += group.size ** 2 > 512
            assert by_rows.dtype == torch.float64
            assert torch.equal(by_rows, whole), (group.name, term.member.param)
            total = torch.ones_like(whole)
            assert torch.equal(cache._accumulate(term, False, total), whole + 1)
    assert blocked > 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_group_costs_are_the_same_with_or_without_row_blocks(dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(costs, "_CHUNK_ELEMENTS", 1 << 30)  # one block: the whole product at once
    spec, whole_cache = _cache(dtype, seed=3)
    expected = {g.name: whole_cache.group_cost(g) for g in spec.active_groups if g.per is None}
    monkeypatch.setattr(costs, "_CHUNK_ELEMENTS", 1 << 22)
    _, cache = _cache(dtype, seed=3)
    monkeypatch.setattr(costs, "_CHUNK_ELEMENTS", 300)
    for name, cost in expected.items():
        blocked = cache.group_cost(spec[name])
        if cost is None:
            assert blocked is None
            continue
        scale = float(abs(cost).max())
        assert float(abs(blocked - cost).max()) <= (1e-12 if dtype == torch.float64 else 1e-5) * scale, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_sliced_matrix_product_casts_a_slice_at_a_time(dtype: torch.dtype, monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 333, generator=generator).to(dtype), torch.randn(24, 333, generator=generator).to(dtype)
    reference = a.double() @ b.double().T
    casts: list[int] = []
    original = torch.Tensor.to

    def counting_to(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        casts.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(costs, "_CHUNK_ELEMENTS", 400)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    for product_dtype, tolerance in [(torch.float32, 1e-5), (torch.float64, 1e-12)]:
        casts.clear()
        product = costs.sliced_matrix_product(a, b, product_dtype)
        assert product.dtype == product_dtype
        assert max(casts) <= 400 and len(casts) >= 2 * 333 // 10
        assert float((product.double() - reference).abs().max()) <= tolerance * float(reference.abs().max())
