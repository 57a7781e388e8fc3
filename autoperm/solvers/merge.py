"""Merging three or more models: MergeMany (Git Re-Basin) and the anchor scheme (Ito et al.)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from autoperm.errors import SolverError
from autoperm.solvers.result import MergeResult, check_state_dicts, is_improvement
from autoperm.solvers.weight_matching import weight_matching
from autoperm.spec import (
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
)

__all__ = ["merge_many", "mean_state_dict"]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, float], None]
"""Called after every MergeMany round (or aligned model, anchor scheme) with its number and objective."""


def merge_many(
    spec: PermutationSpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    method: Literal["wm", "ste"] = "wm",
    scheme: Literal["mergemany", "anchor"] | None = None,
    model: nn.Module | None = None,
    data: Any = None,
    max_rounds: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    tol: float = 1e-12,
    callback: RoundCallback | None = None,
    **ste_options: Any,
) -> MergeResult:
    """Align several models of one architecture and average them.

    Schemes:

    - ``"mergemany"`` (Git Re-Basin, arXiv 2209.04836, Algorithm 3; weight matching only):
      repeat until no model improves: visit the models in a random order and weight-match each
      one to the mean of all the *other* (already permuted) models.
    - ``"anchor"`` (Ito et al., arXiv 2402.04051): align every model to the first one, by weight
      matching (``method="wm"``) or by the straight-through estimator (``method="ste"``, which
      needs ``model`` and ``data``). Ito et al. find WM gives the better multi-model alignment.

    Either way the merged model is the plain mean of the aligned models, expressed in the first
    model's frame (its permutation is the identity). BatchNorm running statistics are averaged
    too; recompute them on training data before evaluating the merge (REPAIR, arXiv 2211.08403).

    Args:
        spec: the permutation spec of the architecture.
        state_dicts: two or more state dicts (left unchanged).
        method: ``"wm"`` or ``"ste"``.
        scheme: ``"mergemany"`` or ``"anchor"``; default ``"mergemany"`` for WM, ``"anchor"`` for STE.
        model: the module (STE only; its own weights are not used).
        data: iterable of ``(inputs, targets)`` batches (STE only).
        max_rounds: the most MergeMany rounds.
        seed: seeds the visiting order and the solvers.
        device: where the cost matmuls run.
        tol: relative improvement below which a MergeMany round counts as no progress.
        callback: progress hook, see :data:`RoundCallback`.
        **ste_options: passed to :func:`autoperm.ste_matching` (``epochs``, ``lr``, ``loss_fn``).

    Returns:
        A :class:`MergeResult` with the merged state dict and one permutation dict per model.

    Raises:
        SolverError: fewer than two models, mismatched state dicts, an unknown method or
            scheme, or STE without a model and data.

    Example:
        >>> merged = merge_many(spec, [sd_1, sd_2, sd_3], method="wm")
        >>> model.load_state_dict(merged.state_dict)
    """
    if len(state_dicts) < 2:
        raise SolverError(f"merging needs at least two state dicts, got {len(state_dicts)}")
    if method not in ("wm", "ste"):
        raise SolverError(f"unknown merge method {method!r}; choose 'wm' or 'ste'")
    scheme = scheme or ("mergemany" if method == "wm" else "anchor")
    if scheme not in ("mergemany", "anchor"):
        raise SolverError(f"unknown merge scheme {scheme!r}; choose 'mergemany' or 'anchor'")
    if method == "ste" and scheme != "anchor":
        raise SolverError("STE merging uses the anchor scheme; pass scheme='anchor' (or leave it out)")
    if method == "ste" and (model is None or data is None):
        raise SolverError("merging with method='ste' needs the model and data (an iterable of (inputs, targets))")
    check_state_dicts(spec, state_dicts, names=[f"#{i + 1}" for i in range(len(state_dicts))])
    if scheme == "anchor":
        return _anchor(spec, state_dicts, method, model, data, seed, device, callback, ste_options)
    return _merge_many(spec, state_dicts, max_rounds, seed, device, tol, callback)


def _merge_many(
    spec: PermutationSpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    max_rounds: int,
    seed: int,
    device: str | torch.device,
    tol: float,
    callback: RoundCallback | None,
) -> MergeResult:
    count = len(state_dicts)
    perms = [identity_permutation(spec) for _ in state_dicts]
    aligned = [dict(sd) for sd in state_dicts]
    generator = np.random.default_rng(seed)
    history: list[float] = []
    converged = False
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        improved = False
        total = 0.0
        for k in generator.permutation(count):
            others = mean_state_dict([aligned[j] for j in range(count) if j != k])
            result = weight_matching(
                spec, others, state_dicts[k], init_perms=perms[k], seed=int(generator.integers(2**31)), device=device
            )
            if is_improvement(result.objective - result.history[0], result.history[0], tol):
                improved = True
            perms[k] = result.perms
            aligned[k] = apply_permutation(spec, result.perms, state_dicts[k])
            total += result.objective
        history.append(total)
        logger.debug("MergeMany round %d: summed objective %.6g", rounds, total)
        if callback is not None:
            callback(rounds, total)
        if not improved:
            converged = True
            break
    to_first = invert_permutation(spec, perms[0])
    perms = [compose_permutations(spec, p, to_first) for p in perms]
    merged = mean_state_dict([apply_permutation(spec, p, sd) for p, sd in zip(perms, state_dicts)])
    logger.info("MergeMany: %d models, %d round(s)%s", count, rounds, "" if converged else " (not converged)")
    return MergeResult(state_dict=merged, perms=perms, n_iter=rounds, converged=converged, history=history)


def _anchor(
    spec: PermutationSpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    model: nn.Module | None,
    data: Any,
    seed: int,
    device: str | torch.device,
    callback: RoundCallback | None,
    ste_options: dict[str, Any],
) -> MergeResult:
    anchor = state_dicts[0]
    perms = [identity_permutation(spec)]
    history: list[float] = []
    converged = True
    for index, state_dict in enumerate(state_dicts[1:], start=1):
        if method == "wm":
            result = weight_matching(spec, anchor, state_dict, seed=seed, device=device)
        else:
            from autoperm.solvers.ste import ste_matching

            assert model is not None
            result = ste_matching(spec, model, anchor, state_dict, data, seed=seed, device=device, **ste_options)
        perms.append(result.perms)
        history.append(result.objective)
        converged &= result.converged
        if callback is not None:
            callback(index, result.objective)
    merged = mean_state_dict([apply_permutation(spec, p, sd) for p, sd in zip(perms, state_dicts)])
    return MergeResult(state_dict=merged, perms=perms, n_iter=len(state_dicts) - 1, converged=converged, history=history)


def mean_state_dict(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The entry-wise mean of floating-point tensors; other entries are taken from the first."""
    first = state_dicts[0]
    result: dict[str, torch.Tensor] = {}
    for name, tensor in first.items():
        if tensor.is_floating_point():
            result[name] = torch.stack([sd[name].to(tensor.device) for sd in state_dicts]).mean(dim=0)
        else:
            result[name] = tensor.clone()
    return result
