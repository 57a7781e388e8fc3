"""Activation matching: align hidden units by the correlation of their activations on data.

Git Re-Basin (arXiv 2209.04836, Section 3.1): for each group, the LAP on the cross-correlation
matrix of the two models' units maximises the summed correlation of matched units. A group is
observed on every activation of the traced graph its axis lives on (``PermutationGroup.activations``);
groups with none are matched by weight matching, with the activation-matched groups held fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from autoperm.data import input_batches
from autoperm.errors import SolverError
from autoperm.solvers.lap import LapMethod, linear_assignment
from autoperm.solvers.result import MatchingResult, check_state_dicts
from autoperm.solvers.weight_matching import weight_matching
from autoperm.spec import PermutationSpec, identity_permutation, member_matrix
from autoperm.spec.runner import ActivationRunner, record_activations

__all__ = ["CrossMoments", "activation_matching", "correlation_matrix"]

logger = logging.getLogger(__name__)


def activation_matching(
    spec: PermutationSpec, runner: ActivationRunner, state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor], data: Any,
    batch_size: int = 500,
    max_batches: int | None = None,
    max_iter: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    lap: LapMethod = "auto",
) -> MatchingResult:
    """Match every group observable on an activation by correlation; the rest by weight matching.

    For each plain group with activation sites, the activations of both models on ``data`` (from
    ``runner``, which runs the graph the spec was traced from) are viewed as ``(units, samples)``
    per site, standardised per unit, and their cross-correlations summed over sites; one LAP
    (maximise) gives the permutation. Fibred groups and groups without sites fall back to weight
    matching, warm-started with the activation-matched groups held fixed.

    Args:
        spec: the permutation spec (its groups' ``activations`` name traced-graph nodes).
        runner: yields the outputs of the spec's nodes, e.g.
            ``autoperm.trace.GraphRunner.for_spec(spec, model)`` (:func:`autoperm.activation_matching`
            builds it from the model).
        state_dict_a, state_dict_b: the two models' state dicts.
        data: ``(inputs, targets)`` batches or an ``(inputs, targets)`` pair; targets are ignored.
        batch_size: batch size when ``data`` is a tensor pair.
        max_batches: use at most this many batches.
        max_iter, seed, device: passed to weight matching for the fallback groups.
        lap: the linear assignment backend of every group's LAP and of the fallback
            (:func:`autoperm.solvers.lap.linear_assignment`).

    Returns:
        A :class:`MatchingResult`; ``fallback_groups`` lists the groups solved by weight matching,
        ``objective`` is the weight-matching objective of the permutations found.

    Raises:
        SolverError: mismatched state dicts, or no batches in ``data``.
    """
    check_state_dicts(spec, [state_dict_a, state_dict_b])
    observed = [g for g in spec.active_groups if g.activations and g.per is None]
    batches = input_batches(data, batch_size, max_batches)
    if not batches:
        raise SolverError("activation matching got no batches from data; give (inputs, targets) batches")
    nodes = sorted({site.node for group in observed for site in group.activations})
    recorded = [record_activations(runner, nodes, batches, state_dict) if nodes else {} for state_dict in (state_dict_a, state_dict_b)]
    perms = identity_permutation(spec)
    for group in observed:
        correlation = sum(
            correlation_matrix(
                [member_matrix(x, site, group.size) for x in recorded[0][site.node]],
                [member_matrix(x, site, group.size) for x in recorded[1][site.node]],
            )
            for site in group.activations
        )
        columns = linear_assignment(np.asarray(correlation), method=lap).columns
        perms[group.name] = torch.as_tensor(columns, dtype=torch.long)
    fallback = tuple(g.name for g in spec.active_groups if g not in observed)
    if fallback:
        logger.info("activation matching: %d group(s) have no activation; using weight matching for %s", len(fallback), list(fallback))
    result = weight_matching(
        spec, state_dict_a, state_dict_b, init_perms=perms, groups=fallback, max_iter=max_iter if fallback else 0,
        seed=seed, device=device, lap=lap,
    )
    return MatchingResult(
        perms=result.perms, objective=result.objective, n_iter=result.n_iter, converged=result.converged or not fallback,
        history=result.history, fallback_groups=fallback,
    )


def correlation_matrix(a: list[torch.Tensor], b: list[torch.Tensor], eps: float = 1e-8) -> np.ndarray:
    """Pearson correlation between the rows of ``a`` and of ``b``, accumulated over chunks.

    Args:
        a, b: lists of ``(units, samples)`` chunks (one per batch), paired.

    Returns:
        ``(units, units)`` float64 array; a constant unit correlates 0 with everything.
    """
    moments = CrossMoments()
    for chunk_a, chunk_b in zip(a, b):
        moments.add(chunk_a, chunk_b)
    return moments.correlation(eps).numpy()


class CrossMoments:
    """Running float64 sums of two paired ``(units, samples)`` streams, for their cross moments.

    :meth:`add` takes one chunk of each stream (the same samples); :meth:`correlation` gives the
    Pearson correlation of every unit of the first stream with every unit of the second, and
    :meth:`cross` their mean product ``E[x y^T]`` (not centred). Memory: ``units_a x units_b``.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sums: list[torch.Tensor] | None = None  # sum x, sum y, sum x^2, sum y^2, sum x y^T

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add paired chunks ``x`` ``(units_a, samples)`` and ``y`` ``(units_b, samples)``."""
        x, y = x.double(), y.double()
        parts = [x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1), x @ y.T]
        self._sums = parts if self._sums is None else [total + part for total, part in zip(self._sums, parts)]
        self.count += x.shape[1]

    def _totals(self) -> list[torch.Tensor]:
        assert self._sums is not None and self.count > 0, "no samples were added"
        return [total.cpu() / self.count for total in self._sums]

    def cross(self) -> torch.Tensor:
        """``E[x y^T]``: ``(units_a, units_b)`` float64, on the CPU."""
        return self._totals()[4]

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        """Pearson correlations, ``(units_a, units_b)`` float64 on the CPU; a constant unit correlates 0."""
        mean_a, mean_b, square_a, square_b, cross = self._totals()
        covariance = cross - mean_a[:, None] * mean_b[None, :]
        std_a = (square_a - mean_a**2).clamp_min(0).sqrt()
        std_b = (square_b - mean_b**2).clamp_min(0).sqrt()
        return covariance / (std_a[:, None] * std_b[None, :] + eps)
