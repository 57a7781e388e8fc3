"""Linear assignment (the LAP at the heart of weight matching), with a backend per size and device.

``linear_assignment(score)`` solves ``max_P sum_i score[i, P[i]]`` (or the minimum) over the
permutations ``P`` of a square matrix, with one of three backends:

- ``"scipy"``: :func:`scipy.optimize.linear_sum_assignment` (shortest augmenting paths,
  Crouse, IEEE TAES 2016), exact.
- ``"lapx"``: the Jonker-Volgenant solver of the PyPI package ``lapx`` (imported as ``lap``;
  Jonker & Volgenant, Computing 38, 1987), exact, in float64; optional.
- ``"auction"``: Bertsekas' auction algorithm with epsilon scaling (Bertsekas, Annals of
  Operations Research 14, 1988; Bertsekas & Castanon, Parallel Computing 17, 1991), in torch,
  with Jacobi (all unassigned rows bid at once) rounds, so it runs on a GPU without copying the
  score to the host. It stops at a final epsilon and *certifies* its result: the gap between the
  assignment's value and the dual bound of its prices is computed and returned, and it is at
  most ``n * epsilon`` (``gap <= tolerance * max|score|``).

``method="auto"`` first checks whether every row's best column is a different column: that
assignment is then optimal (no assignment beats each row's maximum), found in ``O(n^2)``
(``method="argmax"`` in the result; planted pairs' costs look like this). Otherwise it picks
``lapx`` when installed, ``n >= 256`` and the
rows' best columns are nearly a permutation (planted-like costs, where lapx is 2-3x faster than
scipy), otherwise scipy (2x faster than lapx on unstructured costs; ``benchmarks/README.md``).
A CUDA score is copied to the host for them: the auction is chosen only by name, because on a
CPU its Jacobi rounds are 10-100x slower than the exact solvers and on a GPU it has not been
measured against them yet (``benchmarks/device_check.sh`` does).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from autoperm.errors import SolverError

__all__ = ["LAP_METHODS", "Assignment", "available_methods", "linear_assignment", "linear_assignments"]

logger = logging.getLogger(__name__)

LapMethod = Literal["auto", "scipy", "lapx", "auction"]
LAP_METHODS: tuple[str, ...] = ("auto", "scipy", "lapx", "auction")

_LAPX_MIN_SIZE = 256
"""Smallest score ``auto`` gives ``lapx`` (below, every backend takes well under a millisecond)."""


@dataclass(frozen=True)
class Assignment:
    """The solution of one linear assignment problem.

    Attributes:
        columns: ``columns[i]`` is the column assigned to row ``i`` (int64 numpy array).
        value: ``sum_i score[i, columns[i]]`` in float64.
        method: the backend that solved it.
        gap: an upper bound on ``|optimum - value|`` (0 for the exact backends; for the
            auction the certified duality gap of its final prices).
        prices: the auction's final column prices (``None`` for other backends): pass them as
            ``prices`` to warm-start a similar problem.
    """

    columns: np.ndarray
    value: float
    method: str
    gap: float = 0.0
    prices: torch.Tensor | None = None


def available_methods() -> list[str]:
    """The backends usable in this environment (``lapx`` only when the package is installed)."""
    methods = ["scipy", "auction"]
    if importlib.util.find_spec("lap") is not None:
        methods.insert(1, "lapx")
    return methods


def linear_assignment(
    score: np.ndarray | torch.Tensor,
    maximize: bool = True,
    method: LapMethod = "auto",
    tolerance: float = 1e-9,
    prices: torch.Tensor | None = None,
) -> Assignment:
    """Solve the square linear assignment problem ``max_P sum_i score[i, P[i]]`` (or ``min``).

    Args:
        score: an ``(n, n)`` matrix (numpy array or torch tensor, on any device). Not modified.
        maximize: maximise the total (weight matching) rather than minimise it.
        method: ``"auto"``, ``"scipy"``, ``"lapx"`` or ``"auction"`` (see the module docstring).
        tolerance: auction only: the final epsilon is ``tolerance * max|score| / n``, so the
            returned ``gap`` is at most ``tolerance * max|score|``.
        prices: auction only: column prices of an earlier, similar problem (``Assignment.prices``)
            to start from (in the maximisation sense); ignored by the other backends.

    Returns:
        An :class:`Assignment` with the columns, the value, the backend and the gap bound.

    Raises:
        SolverError: the score is not a square finite matrix, ``method`` is unknown, or
            ``lapx`` was asked for but is not installed.

    Complexity:
        scipy and lapx ``O(n^3)`` worst case; the auction ``O(n^2)`` per round, with a number of
        rounds that grows with ``log(1 / tolerance)`` and the hardness of the problem.

    Example:
        >>> result = linear_assignment(np.array([[1.0, 5.0], [4.0, 1.0]]))
        >>> result.columns.tolist(), result.value
        ([1, 0], 9.0)
    """
    if method not in LAP_METHODS:
        raise SolverError(f"unknown linear assignment method {method!r}; choose one of {list(LAP_METHODS)}")
    if score.ndim != 2 or score.shape[0] != score.shape[1]:
        raise SolverError(f"linear assignment needs a square score matrix, got shape {list(score.shape)}")
    n = score.shape[0]
    if method == "auto":
        shortcut = _row_best_if_permutation(score, maximize)
        if shortcut is not None:
            return Assignment(shortcut, float(score[np.arange(n), shortcut].sum()), "argmax")
        method = _pick(score, maximize)
    if method == "auction":
        tensor = torch.as_tensor(score)
        if not bool(torch.isfinite(tensor).all()):
            raise SolverError("linear assignment score has NaN or infinite entries")
        return _auction(tensor if maximize else -tensor, tolerance, prices, maximize)
    array = score.detach().cpu().numpy() if isinstance(score, torch.Tensor) else np.asarray(score)
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise SolverError("linear assignment score has NaN or infinite entries")
    if n == 0:
        return Assignment(np.zeros(0, dtype=np.int64), 0.0, method)
    if method == "lapx":
        columns = _lapx(array, maximize)
    else:
        from scipy.optimize import linear_sum_assignment

        columns = linear_sum_assignment(array, maximize=maximize)[1].astype(np.int64)
    return Assignment(columns, float(array[np.arange(n), columns].sum()), method)


_PARALLEL_MIN_PROBLEMS = 8
"""Fewest problems :func:`linear_assignments` hands to its threads (below, one thread is as fast)."""

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def linear_assignments(scores: np.ndarray, maximize: bool = True, method: LapMethod = "auto") -> list[Assignment]:
    """Solve many small assignment problems, ``scores[k]`` each, on ``torch.get_num_threads()`` threads.

    The exact backends release the GIL while they solve, so the problems of one batch (every
    pair of heads of an attention layer) run side by side; each result is the one
    :func:`linear_assignment` gives for that score alone.

    Args:
        scores: an ``(n, d, d)`` array (or any sequence of square matrices).
        maximize: maximise each total rather than minimise it.
        method: the backend of every problem (``"auction"`` is solved one at a time).

    Returns:
        One :class:`Assignment` per problem, in order.

    Example:
        >>> [a.columns.tolist() for a in linear_assignments(np.array([[[1.0, 5.0], [4.0, 1.0]]] * 2))]
        [[1, 0], [1, 0]]
    """
    workers = torch.get_num_threads()
    if workers < 2 or len(scores) < _PARALLEL_MIN_PROBLEMS or method == "auction":
        return [linear_assignment(score, maximize, method) for score in scores]
    chunks = [range(start, len(scores), workers) for start in range(workers)]
    solved: list[Assignment | None] = [None] * len(scores)

    def solve(indices: range) -> None:
        for index in indices:
            solved[index] = linear_assignment(scores[index], maximize, method)

    for future in [_executor(workers).submit(solve, chunk) for chunk in chunks]:
        future.result()
    assert all(assignment is not None for assignment in solved)
    return solved  # type: ignore[return-value]


def _executor(workers: int) -> ThreadPoolExecutor:
    """One pool of ``workers`` threads per size asked for, kept for the process."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autoperm-lap")
        return _pools[workers]


def _row_best_if_permutation(score: np.ndarray | torch.Tensor, maximize: bool = True) -> np.ndarray | None:
    """Each row's best column (largest, or smallest when minimising), if no two rows share one:
    then it is an optimal assignment.

    No assignment can beat every row taking its own maximum, so when those maxima sit in distinct
    columns they are the optimum, found in ``O(n^2)`` (the costs of planted pairs, and of every
    group already aligned, usually look like this). Ties between rows are left to a solver.
    """
    if score.shape[0] == 0:
        return None
    if isinstance(score, torch.Tensor):
        if not bool(torch.isfinite(score).all()):
            return None
        best = score.argmax(dim=1) if maximize else score.argmin(dim=1)
        return best.cpu().numpy().astype(np.int64) if torch.unique(best).numel() == best.numel() else None
    array = np.asarray(score)
    if not np.isfinite(array).all():
        return None
    best = array.argmax(axis=1) if maximize else array.argmin(axis=1)
    return best.astype(np.int64) if np.unique(best).size == best.size else None


def _pick(score: np.ndarray | torch.Tensor, maximize: bool = True) -> str:
    """The ``auto`` backend for this score (see the module docstring)."""
    n = score.shape[0]
    if n >= _LAPX_MIN_SIZE and importlib.util.find_spec("lap") is not None and _looks_planted(score, maximize):
        return "lapx"
    return "scipy"


def _looks_planted(score: np.ndarray | torch.Tensor, maximize: bool = True) -> bool:
    """Whether the rows' best columns are nearly a permutation (an easy, planted-like problem).

    On such costs lapx's Jonker-Volgenant solver is 2-3x faster than scipy; on unstructured
    costs (independently initialised models) it is 2x slower (``benchmarks/README.md``).
    """
    if isinstance(score, torch.Tensor):
        best = score.argmax(dim=1) if maximize else score.argmin(dim=1)
    else:
        best = np.asarray(score).argmax(axis=1) if maximize else np.asarray(score).argmin(axis=1)
    distinct = len(torch.unique(best)) if isinstance(best, torch.Tensor) else len(np.unique(best))
    return distinct >= 0.9 * score.shape[0]


def _lapx(array: np.ndarray, maximize: bool) -> np.ndarray:
    """Columns of an optimal assignment from ``lapx``'s Jonker-Volgenant solver, in float64."""
    try:
        import lap
    except ImportError as error:
        raise SolverError("linear assignment method 'lapx' needs the package: pip install lapx") from error
    cost = np.ascontiguousarray(-array if maximize else array)
    if hasattr(lap, "lapjvs"):  # lapx >= 0.6: the faster kernel, forced to float64
        rows, columns = lap.lapjvs(cost, return_cost=False, jvx_like=True, prefer_float32=False)
        assignment = np.empty(len(rows), dtype=np.int64)
        assignment[np.asarray(rows)] = np.asarray(columns)
        return assignment
    _, columns, _ = lap.lapjv(cost)
    return np.asarray(columns, dtype=np.int64)


def _auction(
    benefit: torch.Tensor, tolerance: float, prices: torch.Tensor | None, maximize: bool
) -> Assignment:
    """Forward auction with epsilon scaling on ``benefit`` (maximised), in float64 on its device.

    Every round, each unassigned row bids for its best column ``j`` (value ``benefit - price``)
    the price increase ``best - second best + epsilon``; each column goes to its highest bidder,
    whose previous owner becomes unassigned. Epsilon shrinks by ``_SCALING`` per phase (between
    phases only the rows that violate the new epsilon-complementary slackness lose their column)
    down to ``tolerance * max|benefit| / n``; the final assignment is ``n * epsilon``-optimal, and the
    exact gap to the dual bound ``sum_j price_j + sum_i max_j (benefit_ij - price_j)`` is returned.
    """
    n = benefit.shape[0]
    device = benefit.device
    benefit = benefit.to(torch.float64)
    if n <= 1:
        columns = np.zeros(n, dtype=np.int64)
        value = float(benefit.sum())
        return Assignment(columns, value if maximize else -value, "auction", 0.0, torch.zeros(n, dtype=torch.float64, device=device))
    scale = float(benefit.abs().max())
    if scale == 0.0:
        columns = np.arange(n, dtype=np.int64)
        return Assignment(columns, 0.0, "auction", 0.0, torch.zeros(n, dtype=torch.float64, device=device))
    final_epsilon = tolerance * scale / n
    if prices is None:
        price = torch.zeros(n, dtype=torch.float64, device=device)
        epsilon = scale / 4
    else:
        price = prices.to(device=device, dtype=torch.float64).clone()
        epsilon = max(final_epsilon, scale * 1e-4)
    rows = torch.arange(n, device=device)
    owner = torch.full((n,), -1, dtype=torch.long, device=device)  # column -> row
    column_of = torch.full((n,), -1, dtype=torch.long, device=device)  # row -> column
    rounds = 0
    while True:
        bidders = torch.nonzero(column_of < 0).flatten()
        while bidders.numel():
            rounds += 1
            values = benefit.index_select(0, bidders) - price
            top = values.topk(2, dim=1)
            wanted = top.indices[:, 0]
            bids = price[wanted] + (top.values[:, 0] - top.values[:, 1]) + epsilon
            highest = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
            highest.scatter_reduce_(0, wanted, bids, reduce="amax")
            wins = bids >= highest[wanted]
            winner = torch.full((n,), -1, dtype=torch.long, device=device)
            winner.scatter_reduce_(0, wanted[wins], bidders[wins], reduce="amax")
            sold = torch.nonzero(winner >= 0).flatten()
            previous = owner[sold]
            column_of[previous[previous >= 0]] = -1
            owner[sold] = winner[sold]
            column_of[winner[sold]] = sold
            price[sold] = highest[sold]
            bidders = torch.nonzero(column_of < 0).flatten()
        if epsilon <= final_epsilon:
            break
        epsilon = max(epsilon / _SCALING, final_epsilon)
        # Rows whose column is still within the new epsilon of their best keep it (epsilon-CS).
        values = benefit - price
        loose = values[rows, column_of] < values.max(dim=1).values - epsilon
        owner[column_of[loose]] = -1
        column_of[loose] = -1
    value = float(benefit[rows, column_of].sum())
    dual = float(price.sum() + (benefit - price).max(dim=1).values.sum())
    gap = max(0.0, dual - value)
    logger.debug("auction: n=%d, %d rounds, gap %.3g (bound %.3g)", n, rounds, gap, n * final_epsilon)
    return Assignment(column_of.cpu().numpy().astype(np.int64), value if maximize else -value, "auction", gap, price)


_SCALING = 8.0
"""Factor by which the auction's epsilon shrinks from one phase to the next."""
