"""ste_matching and its warm-started projection: own permutation, step budget, options, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from autoperm import SolverError, apply_permutation, random_permutation
from autoperm.solvers import ste_matching, weight_matching
from autoperm.solvers.projection import WarmProjection, _certify
from autoperm.spec import identity_permutation
from tests._specs import MLP, ConvNet, convnet_spec, mlp_spec, record_lap_methods, train_briefly


def _pair(hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    inputs = torch.randn(96, 10)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
    models = [train_briefly(MLP(10, hidden, 2, 3), inputs, steps=20, seed=s) for s in (1, 2)]
    return models[0], mlp_spec(models[0]), [m.state_dict() for m in models], (inputs, targets)


@pytest.mark.parametrize("seed", range(6))
def test_certificate_agrees_with_brute_force(seed: int) -> None:
    cost = np.random.default_rng(seed).normal(size=(6, 6))
    if seed % 2:  # make the identity optimal half of the time
        best_permutation = max(itertools.permutations(range(6)), key=lambda p: cost[range(6), list(p)].sum())
        cost = cost[:, list(best_permutation)]
    best = max(cost[range(6), list(p)].sum() for p in itertools.permutations(range(6)))
    identity_optimal = np.trace(cost) >= best - 1e-12
    potentials = _certify(cost, np.zeros(6), 1e-12)
    assert (potentials is not None) == identity_optimal
    if potentials is not None:  # they are dual-feasible: v_j >= v_k + C[k, j] - C[k, k]
        assert np.all(potentials[None, :] >= potentials[:, None] + cost - np.diag(cost)[:, None] - 1e-9)


def test_projection_recovers_a_planted_permutation_and_is_coordinate_optimal() -> None:
    model, spec, (sd_a, sd_b), _ = _pair()
    planted = random_permutation(spec, seed=3)
    permuted_a = apply_permutation(spec, planted, sd_a)
    projection = WarmProjection(spec, permuted_a, identity_permutation(spec), seed=0)
    perms = projection.project(sd_a)
    restored = apply_permutation(spec, perms, permuted_a)
    assert all(torch.equal(restored[k], sd_a[k]) for k in sd_a)
    # from weight matching's answer on an unrelated B, the warm projection changes nothing
    wm = weight_matching(spec, sd_a, sd_b)
    again = WarmProjection(spec, sd_b, wm.perms).project(sd_a)
    check = weight_matching(spec, sd_a, sd_b, init_perms=again)
    assert all(torch.equal(check.perms[g], again[g]) for g in again)


def test_lap_backend_reaches_the_projection(monkeypatch) -> None:
    from autoperm.solvers import projection as module

    _, spec, (sd_a, _), _ = _pair()
    permuted_a = apply_permutation(spec, random_permutation(spec, seed=3), sd_a)
    methods = record_lap_methods(monkeypatch, module)
    perms = WarmProjection(spec, permuted_a, identity_permutation(spec), lap="scipy").project(sd_a)
    assert methods and set(methods) == {"scipy"}
    restored = apply_permutation(spec, perms, permuted_a)
    assert all(torch.equal(restored[k], sd_a[k]) for k in sd_a)


def test_projection_handles_bn_convnets_and_counts_its_work() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(8, 3, 8, 8)
    a, b = (train_briefly(ConvNet(), inputs, seed=s).state_dict() for s in (0, 1))
    spec = convnet_spec(ConvNet())
    start = weight_matching(spec, a, b).perms
    projection = WarmProjection(spec, b, start)
    perms = projection.project(a)
    assert weight_matching(spec, a, b, init_perms=perms).history[-1] == pytest.approx(
        weight_matching(spec, a, b, init_perms=perms, max_iter=0).objective)
    stats = projection.statistics
    assert stats.projections == 1 and stats.certified + stats.lap_solves >= len(spec.active_groups)
    expected = apply_permutation(spec, perms, b)
    assert projection.permuted.keys() == set(spec.members_by_param)
    assert all(torch.equal(projection.permuted[k], expected[k]) for k in projection.permuted)  # BN stats too


def test_ste_returns_the_projection_of_its_own_learned_weights() -> None:
    model, spec, (sd_a, sd_b), data = _pair()
    before = {k: v.clone() for k, v in sd_b.items()}
    wm = weight_matching(spec, sd_a, sd_b)
    result = ste_matching(spec, model, sd_a, sd_b, data, steps=25, lr=0.05, batch_size=32, init_perms=wm.perms)
    assert result.steps == result.n_iter == len(result.history) == 25
    assert result.selected == "final" and result.selected_step == 25
    assert all(np.isfinite(result.history)) and np.isfinite(result.loss) and np.isfinite(result.start_loss)
    # the returned permutation is the closest one to STE's learned copy (weight matching agrees) ...
    learned = {**sd_a, **result.learned}
    confirm = weight_matching(spec, learned, sd_b, init_perms=result.perms)
    assert all(torch.equal(confirm.perms[g], result.perms[g]) for g in result.perms)
    # ... which has moved away from A and from the weight-matching start
    assert any(not torch.allclose(result.learned[k], sd_a[k]) for k in result.learned)
    assert result.changed_groups and any(not torch.equal(result.perms[g], wm.perms[g]) for g in wm.perms)
    assert all(torch.equal(before[k], sd_b[k]) for k in sd_b)  # input untouched


def test_best_selection_sgd_and_random_interpolation() -> None:
    model, spec, (sd_a, sd_b), data = _pair()
    best = ste_matching(spec, model, sd_a, sd_b, data, steps=12, batch_size=32, optimizer="sgd", lr=1e-2,
                        select="best", interpolation="random", seed=1)
    assert best.selected == "best" and best.steps == 12
    assert best.selected_step == int(np.argmin(best.history)) + 1
    epochs = ste_matching(spec, model, sd_a, sd_b, data, epochs=2, batch_size=32)
    assert epochs.steps == 6  # 96 samples in batches of 32, twice


def test_bad_options_and_empty_data_raise_solver_errors() -> None:
    model, spec, (sd_a, sd_b), data = _pair()
    with pytest.raises(SolverError, match="unknown optimizer 'rmsprop'"):
        ste_matching(spec, model, sd_a, sd_b, data, optimizer="rmsprop")
    with pytest.raises(SolverError, match="unknown select"):
        ste_matching(spec, model, sd_a, sd_b, data, select="worst")
    with pytest.raises(SolverError, match="no batches"):
        ste_matching(spec, model, sd_a, sd_b, [], steps=3)
