"""Every linear assignment backend reaches scipy's optimum on random and planted costs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from autoperm.errors import SolverError
from autoperm.solvers.lap import available_methods, linear_assignment, linear_assignments


def _costs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((n, n))
    planted = rng.standard_normal((n, n))
    planted[np.arange(n), rng.permutation(n)] += 6.0
    ties = rng.integers(0, 3, size=(n, n)).astype(np.float64)  # many optimal assignments
    low_rank = rng.standard_normal((n, 4)) @ rng.standard_normal((4, n))  # like a cost A @ B^T
    return {"random": random, "planted": planted, "ties": ties, "low_rank": low_rank}


def _is_permutation(columns: np.ndarray, n: int) -> bool:
    return sorted(columns.tolist()) == list(range(n))


@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("maximize", [True, False])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 257])
def test_backend_reaches_scipy_optimum(method: str, maximize: bool, n: int) -> None:
    if method == "auction" and n > 64:
        pytest.skip("the auction is a GPU backend: about 1 s per size-257 problem on a CPU")
    for kind, cost in _costs(n, seed=n).items():
        rows, columns = linear_sum_assignment(cost, maximize=maximize)
        optimum = cost[rows, columns].sum()
        result = linear_assignment(cost, maximize=maximize, method=method)
        assert _is_permutation(result.columns, n), (method, kind)
        assert result.value == pytest.approx(cost[np.arange(n), result.columns].sum(), abs=1e-9)
        scale = np.abs(cost).max()
        assert abs(result.value - optimum) <= 1e-8 * max(1.0, scale), (method, kind)
        assert 0.0 <= result.gap <= 1e-8 * max(1.0, scale), (method, kind)


def test_planted_permutation_is_recovered_by_every_backend() -> None:
    rng = np.random.default_rng(3)
    n = 300
    planted = rng.permutation(n)
    cost = 0.1 * rng.standard_normal((n, n))
    cost[np.arange(n), planted] += 1.0
    for method in available_methods():
        assert np.array_equal(linear_assignment(cost, method=method).columns, planted), method


def test_brute_force_on_tiny_problems() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        cost = rng.standard_normal((5, 5))
        best = max(sum(cost[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
        for method in available_methods():
            assert linear_assignment(cost, method=method).value == pytest.approx(best, abs=1e-9)


def test_auction_accepts_torch_and_warm_prices() -> None:
    rng = np.random.default_rng(7)
    cost = rng.standard_normal((128, 128))
    cost[np.arange(128), rng.permutation(128)] += 3.0
    cold = linear_assignment(torch.from_numpy(cost), method="auction")
    nudged = cost + 0.01 * rng.standard_normal(cost.shape)
    warm = linear_assignment(nudged, method="auction", prices=cold.prices)
    rows, columns = linear_sum_assignment(nudged, maximize=True)
    assert warm.value == pytest.approx(nudged[rows, columns].sum(), abs=1e-8 * np.abs(nudged).max())
    assert cold.prices is not None and cold.prices.shape == (128,)


def test_inputs_are_left_unchanged() -> None:
    cost = np.random.default_rng(0).standard_normal((40, 40))
    copy = cost.copy()
    tensor = torch.from_numpy(cost.copy())
    for method in available_methods():
        linear_assignment(cost, method=method)
        linear_assignment(tensor, method=method, maximize=False)
    assert np.array_equal(cost, copy) and np.array_equal(tensor.numpy(), copy)


@pytest.mark.parametrize(
    ("score", "method", "message"),
    [
        (np.zeros((2, 3)), "auto", "square"),
        (np.full((2, 2), np.nan), "scipy", "NaN"),
        (np.full((2, 2), np.inf), "auction", "NaN"),
        (np.zeros((2, 2)), "hungarian", "unknown"),
    ],
)
def test_bad_input_raises_solver_error(score: np.ndarray, method: str, message: str) -> None:
    with pytest.raises(SolverError, match=message):
        linear_assignment(score, method=method)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auction_matches_scipy() -> None:
    cost = _costs(1024, seed=11)["planted"]
    result = linear_assignment(torch.from_numpy(cost).cuda())
    assert result.method == "auction"
    rows, columns = linear_sum_assignment(cost, maximize=True)
    assert result.value == pytest.approx(cost[rows, columns].sum(), abs=1e-8 * np.abs(cost).max())


def test_auto_picks_lapx_for_planted_like_costs_and_scipy_otherwise() -> None:
    costs = _costs(300, seed=1)
    planted = costs["planted"].copy()
    planted[0, :] = 0.0  # rows 0 and 1 now share a best column: no shortcut
    planted[1, :] = 0.0
    result = linear_assignment(planted)
    assert result.method == ("lapx" if "lapx" in available_methods() else "scipy")
    assert linear_assignment(costs["random"]).method == "scipy"


@pytest.mark.parametrize("maximize", [True, False])
def test_auto_shortcut_when_row_optima_are_distinct(maximize: bool) -> None:
    rng = np.random.default_rng(4)
    cost = rng.standard_normal((200, 200))
    planted = rng.permutation(200)
    cost[np.arange(200), planted] += 20.0 if maximize else -20.0
    result = linear_assignment(cost, maximize=maximize)
    assert result.method == "argmax" and np.array_equal(result.columns, planted)
    rows, columns = linear_sum_assignment(cost, maximize=maximize)
    assert result.value == pytest.approx(cost[rows, columns].sum())
    tensor = linear_assignment(torch.from_numpy(cost), maximize=maximize)
    assert tensor.method == "argmax" and np.array_equal(tensor.columns, planted)


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_assignments_equal_one_at_a_time(threads):
    """`linear_assignments` on threads gives, problem by problem, what `linear_assignment` gives:
    random scores (the solvers) and planted-like ones (the argmax shortcut), maximised and minimised."""
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((20, 12, 12))
    scores[::3] += 50 * np.eye(12)[rng.permutation(12)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for maximize in (True, False):
            batched = linear_assignments(scores, maximize=maximize)
            single = [linear_assignment(score, maximize=maximize) for score in scores]
            assert [b.columns.tolist() for b in batched] == [s.columns.tolist() for s in single]
            assert [b.value for b in batched] == [s.value for s in single]
            assert [b.method for b in batched] == [s.method for s in single]
    finally:
        torch.set_num_threads(previous)
