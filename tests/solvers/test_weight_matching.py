"""Weight matching: planted recovery, brute force on tiny problems, a cache-free reference."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import autoperm
from autoperm import SolverError, apply_permutation, random_permutation
from autoperm.solvers import weight_matching
from autoperm.spec import permute_tensor
from tests._specs import MLP, ConvNet, convnet_spec, mlp_spec, resnet20, resnet20_spec, train_briefly


def _cases():
    return {
        "mlp": (lambda: MLP(in_features=16, hidden=8, depth=3, num_classes=4), mlp_spec, (32, 16)),
        "convnet": (ConvNet, convnet_spec, (32, 3, 8, 8)),
        "resnet20": (lambda: resnet20(width=1), resnet20_spec, (8, 3, 32, 32)),
    }


def _objective(spec, sd_a, sd_b, perms) -> float:
    """Independent objective: <A, pi(B)> over every permuted float tensor but running stats."""
    permuted = apply_permutation(spec, perms, sd_b)
    return sum(
        float((sd_a[name].double() * permuted[name].double()).sum())
        for name in spec.members_by_param
        if sd_a[name].is_floating_point() and "running" not in name
    )


@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
@pytest.mark.parametrize("case", ["mlp", "convnet", "resnet20"])
def test_recovers_planted_permutation_exactly(case: str, trained: bool) -> None:
    factory, make_spec, input_shape = _cases()[case]
    torch.manual_seed(0)
    model = factory()
    if trained:
        train_briefly(model, torch.randn(input_shape))
    spec = make_spec(model)
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, random_permutation(spec, seed=3), sd_a)
    assert any(not torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    result = weight_matching(spec, sd_a, sd_b)

    aligned = apply_permutation(spec, result.perms, sd_b)
    for name, tensor in sd_a.items():
        assert torch.equal(aligned[name], tensor), name
    assert result.converged
    assert result.objective == pytest.approx(_objective(spec, sd_a, sd_b, result.perms), rel=1e-9)


def test_history_is_monotone_and_matches_objective() -> None:
    torch.manual_seed(1)
    spec = resnet20_spec(resnet20())
    sd_a, sd_b = resnet20().state_dict(), resnet20().state_dict()
    result = weight_matching(spec, sd_a, sd_b, seed=5)
    assert result.history[0] == pytest.approx(_objective(spec, sd_a, sd_b, {}), rel=1e-9)
    assert all(later >= earlier - 1e-6 for earlier, later in zip(result.history, result.history[1:]))
    assert len(result.history) == result.n_iter + 1
    assert result.objective == pytest.approx(_objective(spec, sd_a, sd_b, result.perms), rel=1e-9)
    assert result.objective > result.history[0]


@settings(max_examples=25, deadline=None)
@given(size=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_single_group_equals_brute_force(size: int, seed: int) -> None:
    torch.manual_seed(seed)
    model_a = MLP(in_features=3, hidden=size, depth=1, num_classes=2)
    model_b = MLP(in_features=3, hidden=size, depth=1, num_classes=2)
    spec = mlp_spec(model_a)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()

    result = weight_matching(spec, sd_a, sd_b)

    best = max(
        _objective(spec, sd_a, sd_b, {"hidden0": torch.tensor(p)}) for p in itertools.permutations(range(size))
    )
    assert result.objective == pytest.approx(best, rel=1e-9, abs=1e-9)


def _reference_weight_matching(spec, sd_a, sd_b, seed: int, max_iter: int = 100) -> dict[str, torch.Tensor]:
    """Git Re-Basin's loop, rebuilding every cost matrix from scratch on every visit."""
    perms = {g.name: torch.arange(g.size) for g in spec.active_groups}
    groups = list(spec.active_groups)
    rng = np.random.default_rng(seed)
    for sweep in range(max_iter):
        progress = sweep == 0
        order = rng.permutation(len(groups))
        pending = {g.name for g in groups} if sweep == 0 else set()
        for index in order if sweep else range(len(groups)):  # the first sweep from input to output
            group = groups[index]
            cost = torch.zeros(group.size, group.size, dtype=torch.float64)
            for member in group.members:
                if "running" in member.param:
                    continue
                others = {g.name for g, _ in spec.members_by_param[member.param]} - {group.name}
                if others & pending:  # first sweep: terms of groups not visited yet wait
                    continue
                b = permute_tensor(spec, perms, member.param, sd_b[member.param], skip={group.name})
                a_mat = sd_a[member.param].movedim(member.axis, 0).reshape(group.size, -1)
                b_mat = b.movedim(member.axis, 0).reshape(group.size, -1)
                cost += (a_mat @ b_mat.T).double()
            _, columns = linear_sum_assignment(cost.numpy(), maximize=True)
            old = cost[torch.arange(group.size), perms[group.name]].sum()
            new = cost[torch.arange(group.size), torch.as_tensor(columns)].sum()
            if new - old > 1e-12 * max(1.0, abs(float(old))):
                perms[group.name] = torch.as_tensor(columns)
                progress = True
            pending.discard(group.name)
        if not progress:
            break
    return perms


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_solver_equals_cache_free_reference(seed: int) -> None:
    torch.manual_seed(seed)
    model_a, model_b = MLP(16, 10, 4, 3).double(), MLP(16, 10, 4, 3).double()
    spec = mlp_spec(model_a)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    expected = _reference_weight_matching(spec, sd_a, sd_b, seed=seed)
    result = weight_matching(spec, sd_a, sd_b, seed=seed)
    for name, perm in expected.items():
        assert torch.equal(result.perms[name], perm), name


def test_init_perms_at_the_optimum_stop_after_one_sweep() -> None:
    model = ConvNet()
    spec = convnet_spec(model)
    sd_a = model.state_dict()
    planted = random_permutation(spec, seed=0)
    sd_b = apply_permutation(spec, planted, sd_a)
    inverse = autoperm.invert_permutation(spec, planted)
    result = weight_matching(spec, sd_a, sd_b, init_perms=inverse)
    assert result.n_iter == 1 and result.converged
    assert all(torch.equal(result.perms[name], inverse[name]) for name in inverse)


def test_groups_argument_solves_only_those_groups() -> None:
    model = MLP(16, 8, 3, 4)
    spec = mlp_spec(model)
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, random_permutation(spec, seed=2), sd_a)
    result = weight_matching(spec, sd_a, sd_b, groups={"hidden1"})
    assert torch.equal(result.perms["hidden0"], torch.arange(8))
    assert torch.equal(result.perms["hidden2"], torch.arange(8))
    with pytest.raises(SolverError, match="nope"):
        weight_matching(spec, sd_a, sd_b, groups={"nope"})


def test_inputs_are_not_modified_and_callback_sees_every_sweep() -> None:
    model = MLP(16, 8, 3, 4)
    spec = mlp_spec(model)
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, random_permutation(spec, seed=2), sd_a)
    copies = {k: v.clone() for k, v in sd_b.items()}
    seen: list[tuple[int, float]] = []
    result = weight_matching(spec, sd_a, sd_b, callback=lambda sweep, value: seen.append((sweep, value)))
    assert all(torch.equal(sd_b[k], copies[k]) for k in sd_b)
    assert [s for s, _ in seen] == list(range(1, result.n_iter + 1))
    assert seen[-1][1] == pytest.approx(result.objective, rel=1e-6)


def test_mismatched_state_dicts_name_the_offending_keys() -> None:
    model = MLP(16, 8, 3, 4)
    spec = mlp_spec(model)
    sd_a = model.state_dict()
    missing = {k: v for k, v in sd_a.items() if k != "layers.1.bias"}
    with pytest.raises(SolverError, match=r"state dict B .*missing 'layers.1.bias'"):
        weight_matching(spec, sd_a, missing)
    wrong = dict(sd_a, **{"head.weight": torch.zeros(4, 9)})
    with pytest.raises(SolverError, match=r"'head.weight' has shape \[4, 9\], expected \[4, 8\]"):
        weight_matching(spec, sd_a, wrong)
    extra = dict(sd_a, extra=torch.zeros(1))
    with pytest.raises(SolverError, match="unexpected 'extra'"):
        weight_matching(spec, extra, sd_a)


@pytest.mark.parametrize("case", ["convnet", "resnet20"])
def test_sliced_products_recover_planted_permutation_and_equal_reference(case: str, monkeypatch) -> None:
    """Large tensors are multiplied a slice at a time; force that path on small models."""
    module = importlib.import_module("autoperm.solvers.costs")
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 64)
    factory, make_spec, _ = _cases()[case]
    torch.manual_seed(0)
    model = factory().double()
    spec = make_spec(model)
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, random_permutation(spec, seed=5), sd_a)
    result = weight_matching(spec, sd_a, sd_b)
    aligned = apply_permutation(spec, result.perms, sd_b)
    assert all(torch.equal(aligned[name], tensor) for name, tensor in sd_a.items())
    assert result.objective == pytest.approx(_objective(spec, sd_a, sd_b, result.perms), rel=1e-9)
    other = factory().double().state_dict()
    expected = _reference_weight_matching(spec, sd_a, other, seed=1)
    sliced = weight_matching(spec, sd_a, other, seed=1)
    for name, perm in expected.items():
        assert torch.equal(sliced.perms[name], perm), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recovers_planted_permutation_on_cuda() -> None:
    torch.manual_seed(0)
    model = resnet20(width=1)
    spec = resnet20_spec(model)
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, random_permutation(spec, seed=3), sd_a)
    result = weight_matching(spec, sd_a, sd_b, device="cuda")
    assert all(p.device.type == "cpu" for p in result.perms.values())
    aligned = apply_permutation(spec, result.perms, sd_b)
    for name, tensor in sd_a.items():
        assert torch.equal(aligned[name], tensor), name
    assert result.converged


def _identity_costs(spec, sd_a, sd_b) -> dict[str, torch.Tensor]:
    """Each plain group's cost at the identity, ``sum_m A_m @ B_m^T``, in float64 from the stored values."""
    from autoperm.spec import member_matrix

    costs = {}
    for group in spec.active_groups:
        if group.per is not None:
            continue
        members = [m for m in group.members if sd_a[m.param].is_floating_point() and "running" not in m.param]
        if members:
            costs[group.name] = sum(
                member_matrix(sd_a[m.param].double(), m, group.size) @ member_matrix(sd_b[m.param].double(), m, group.size).T
                for m in members
            )
    return costs


@pytest.mark.parametrize("chunk", [1 << 22, 64], ids=["whole", "sliced"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_costs_are_float32_products(dtype: torch.dtype, chunk: int, monkeypatch) -> None:
    """Costs of bfloat16 / float16 tensors are their float32 products (not rounded to 8 or 11 bits)."""
    costs = importlib.import_module("autoperm.solvers.costs")
    monkeypatch.setattr(costs, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    model = resnet20(width=1)
    spec = resnet20_spec(model)
    sd_a = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd_b = {k: v.to(dtype) if v.is_floating_point() else v for k, v in resnet20(width=1).state_dict().items()}
    names = [n for n in spec.members_by_param if sd_a[n].is_floating_point() and "running" not in n]
    state = costs.PermutationState({g.name: torch.arange(g.size) for g in spec.active_groups})
    cache = costs.CostCache(spec, sd_a, sd_b, names, state, torch.device("cpu"))
    for name, expected in _identity_costs(spec, sd_a, sd_b).items():
        cost = torch.from_numpy(cache.group_cost(spec[name]))
        scale = float(expected.abs().max())
        assert float((cost - expected).abs().max()) <= 1e-5 * scale, name


def test_matrix_product_casts_half_precision_only() -> None:
    from autoperm.solvers.costs import matrix_product

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 300, generator=generator), torch.randn(32, 300, generator=generator)
    for dtype, expected in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        product = matrix_product(a.to(dtype), b.to(dtype))
        assert product.dtype == expected
        reference = a.to(dtype).double() @ b.to(dtype).double().T
        assert torch.allclose(product.double(), reference, rtol=0, atol=1e-4), dtype
    assert torch.equal(matrix_product(a, b), a @ b.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_planted_permutation_recovered_through_sliced_products(dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(importlib.import_module("autoperm.solvers.costs"), "_CHUNK_ELEMENTS", 64)
    torch.manual_seed(0)
    model = resnet20(width=1)
    spec = resnet20_spec(model)
    sd_a = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd_b = apply_permutation(spec, random_permutation(spec, seed=5), sd_a)
    aligned = apply_permutation(spec, weight_matching(spec, sd_a, sd_b).perms, sd_b)
    assert all(torch.equal(aligned[name], tensor) for name, tensor in sd_a.items())


def test_group_callback_reports_every_group_of_every_sweep() -> None:
    torch.manual_seed(0)
    model = MLP(in_features=16, hidden=8, depth=3, num_classes=4)
    spec = mlp_spec(model)
    sd_b = MLP(in_features=16, hidden=8, depth=3, num_classes=4).state_dict()
    calls: list[tuple[int, int]] = []
    result = weight_matching(spec, model.state_dict(), sd_b, group_callback=lambda done, total: calls.append((done, total)))
    groups = len(spec.active_groups)
    assert calls == [(done, groups) for _ in range(result.n_iter) for done in range(1, groups + 1)]
