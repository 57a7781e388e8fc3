"""Alignment with every symmetry kind: canonical forms, generalised weight matching, learned refinement.

The pipeline of Theus et al. ("Generalized Linear Mode Connectivity for Transformers",
arXiv 2506.22712), for any model whose spec inference understands:

1. permutation weight matching on the weights as they are (canonical forms make it worse);
2. both models to their canonical form (:func:`autoperm.canonicalize`: norm gains folded into
   their readers, so streams admit orthogonal maps), and with ``symmetries="full"`` invertible
   and scale groups to their balanced gauge (:mod:`autoperm.solvers.gauge`);
3. generalised weight matching (:func:`autoperm.solvers.generalized.generalized_matching`), or
   with ``method="act"`` generalised activation matching on data
   (:func:`autoperm.solvers.generalized_activation.generalized_activation_matching`; step 1 is
   then skipped: activations are solved from B as it is);
4. optionally, the maps learned on data (:func:`autoperm.solvers.refine.refine`): Adam on the
   midpoint loss of ``(theta_A + T(theta_B)) / 2``, each orthogonal map parametrised as
   ``exp(K - K^T) T_0``, and the permutations straight-through (with ``learn_permutations=False``
   they stay as found);
5. B mapped back to A's gauge: A's balancing undone and A's norm gains unfolded into B's readers
   (:func:`autoperm.to_gauge`), so the output pairs with the user's A unchanged. Interpolating
   A with it computes exactly what interpolating the two canonical forms computes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from autoperm.errors import SolverError
from autoperm.solvers.activation_matching import activation_matching
from autoperm.solvers.gauge import balancing_transforms, invert
from autoperm.solvers.generalized import SYMMETRIES, Symmetries, generalized_matching
from autoperm.solvers.generalized_activation import generalized_activation_matching
from autoperm.solvers.refine import LossFunction, refine
from autoperm.solvers.result import check_state_dicts
from autoperm.solvers.weight_matching import weight_matching
from autoperm.spec import PermutationSpec, apply_permutation, canonicalize, identity_permutation, to_gauge
from autoperm.spec.runner import ActivationRunner
from autoperm.spec.transform import apply_transform

__all__ = ["METHODS", "Alignment", "align"]

logger = logging.getLogger(__name__)

Method = Literal["wm", "act"]
METHODS: tuple[str, ...] = ("wm", "act")
"""How :func:`align` finds the maps: weight matching, or activation matching on data."""


@dataclass
class Alignment:
    """B aligned to A by :func:`align`.

    Attributes:
        state_dict: B aligned, in A's gauge: interpolate it with A as it is.
        symmetries: the symmetries used.
        spec: the spec the ``transforms`` belong to (canonical when norms were folded).
        transforms: the transform of each group, from B's canonical (and balanced) form after the
            permutations ``perms`` to the aligned B before step 5 of the module docstring.
        perms: the permutation weight matching's result (step 1); with ``method="act"`` the
            permutation activation matching's under ``symmetries="permutation"``, else the identity.
        objective: ``sum <W_A, T(W_B)>`` in canonical coordinates after generalised matching.
        start_objective: the same after the permutations alone.
        sweeps: generalised-matching sweeps (with ``method="act"``: of its weight-matching fallback).
        refined: whether the continuous maps were learned on data.
        losses: the refinement's batch midpoint losses (empty without refinement).
        seconds: wall time of the whole alignment.
    """

    state_dict: dict[str, torch.Tensor]
    symmetries: str
    spec: PermutationSpec
    transforms: dict[str, torch.Tensor]
    perms: dict[str, torch.Tensor]
    objective: float = math.nan
    start_objective: float = math.nan
    sweeps: int = 0
    refined: bool = False
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    method: str = "wm"


def align(
    spec: PermutationSpec,
    state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor],
    symmetries: Symmetries = "orthogonal",
    seed: int = 0,
    max_iter: int = 100,
    model: nn.Module | None = None,
    data: Any = None,
    steps: int = 0,
    lr: float = 1e-2,
    batch_size: int = 256,
    loss_fn: LossFunction | None = None,
    device: str | torch.device = "cpu",
    sweep_tol: float = 0.0,
    method: Method = "wm",
    runner: ActivationRunner | None = None,
    max_sweeps: int | None = None,
    learn_permutations: bool = True,
) -> Alignment:
    """Align B to A with the symmetries asked for (see the module docstring).

    Args:
        spec: the spec of the architecture (as inferred: kinds of the model as it is).
        state_dict_a: the reference model (not modified).
        state_dict_b: the model to align (not modified).
        symmetries: ``"permutation"``, ``"orthogonal"`` or ``"full"``.
        seed: seeds the solvers and the refinement's batches.
        max_iter: the most sweeps of each weight matching.
        model: a module of the architecture (needed to refine).
        data: ``(inputs, targets)`` batches to refine on (with ``steps > 0`` required) and, with
            ``method="act"``, to match activations on (required).
        steps: Adam steps of the learned refinement (0: none).
        lr: the refinement's learning rate.
        batch_size: the refinement's and the activations' batch size when ``data`` is a tensor pair.
        loss_fn: the task loss (default: cross-entropy over the last axis).
        device: where products and the refinement run.
        sweep_tol: generalised matching stops after a sweep that gains less than this,
            relatively (:func:`autoperm.solvers.generalized.generalized_matching`).
        max_sweeps: the most generalised-matching sweeps (default: ``max_iter``); a sweep costs about
            a weight-matching sweep of the same model, and the first gains most (see the README).
        method: ``"wm"`` (weight matching) or ``"act"`` (activation matching on ``data``: the
            Pearson correlation for permutations, orthogonal Procrustes on the activations' cross
            moment for orthogonal maps; invertible and scale groups balanced first with ``"full"``).
        learn_permutations: with ``steps > 0``, learn the permutation groups straight-through
            together with the continuous maps (``False``: only the continuous maps are learned).
        runner: with ``method="act"``, runs the model the spec was inferred from on a state
            dict and yields the spec's nodes (``autoperm.trace.GraphRunner.for_spec(spec, model)``).

    Returns:
        An :class:`Alignment`.

    Raises:
        SolverError: unknown ``symmetries`` or ``method``, state dicts that do not fit the spec,
            ``steps > 0`` without ``model`` and ``data``, or ``method="act"`` without ``runner``
            and ``data``.

    Example:
        >>> result = align(spec, model_a.state_dict(), model_b.state_dict(), symmetries="full")
        >>> model_b.load_state_dict(result.state_dict)  # interpolate with model_a as it is
    """
    started = time.perf_counter()
    if symmetries not in SYMMETRIES:
        raise SolverError(f"unknown symmetries {symmetries!r}; choose from {list(SYMMETRIES)}")
    if method not in METHODS:
        raise SolverError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if steps > 0 and (model is None or data is None):
        raise SolverError("refining the continuous maps (steps > 0) needs the model and data")
    if method == "act" and (runner is None or data is None):
        raise SolverError("method='act' needs data and a runner of the model the spec was inferred from: "
                          "runner=autoperm.trace.GraphRunner.for_spec(spec, model)")
    check_state_dicts(spec, [state_dict_a, state_dict_b])
    if method == "wm":
        perms = weight_matching(spec, state_dict_a, state_dict_b, max_iter=max_iter, seed=seed, device=device).perms
    elif symmetries == "permutation":
        perms = activation_matching(spec, runner, state_dict_a, state_dict_b, data, batch_size=batch_size, max_iter=max_iter,
                                    seed=seed, device=device).perms
    else:
        perms = identity_permutation(spec)
    permuted = apply_permutation(spec, perms, state_dict_b) if method == "wm" or symmetries == "permutation" else dict(state_dict_b)
    if symmetries == "permutation":
        return Alignment(permuted, symmetries, spec, dict(perms), dict(perms), seconds=time.perf_counter() - started,
                         method=method)
    sweeps = max_iter if max_sweeps is None else max_sweeps
    canonical_spec, canonical_a = canonicalize(spec, state_dict_a)
    _, canonical_b = canonicalize(spec, permuted)
    gauge_a: dict[str, torch.Tensor] = {}
    if symmetries == "full":
        gauge_a = balancing_transforms(canonical_spec, canonical_a)
        canonical_a = apply_transform(canonical_spec, gauge_a, canonical_a)
        canonical_b = apply_transform(canonical_spec, balancing_transforms(canonical_spec, canonical_b), canonical_b)
    if method == "act":
        matched = generalized_activation_matching(canonical_spec, runner, canonical_a, canonical_b, data, symmetries,
                                                  batch_size=batch_size, max_iter=sweeps, seed=seed, device=device,
                                                  sweep_tol=sweep_tol)
    else:
        matched = generalized_matching(canonical_spec, canonical_a, canonical_b, symmetries, max_iter=sweeps, seed=seed,
                                       init_perms=identity_permutation(canonical_spec), device=device, sweep_tol=sweep_tol)
    transforms, losses = matched.transforms, []
    if steps > 0:
        transforms, losses = refine(canonical_spec, model, canonical_a, canonical_b, transforms, data, steps=steps, lr=lr,
                                    batch_size=batch_size, loss_fn=loss_fn, seed=seed, device=device,
                                    permutations=learn_permutations)
    aligned = apply_transform(canonical_spec, transforms, canonical_b)
    if gauge_a:
        aligned = apply_transform(canonical_spec, invert(canonical_spec, gauge_a), aligned)
    result = to_gauge(spec, aligned, state_dict_a)
    logger.info("aligned with %s symmetries (%s): objective %.6g -> %.6g", symmetries, method, matched.start_objective,
                matched.objective)
    return Alignment(result, symmetries, canonical_spec, transforms, dict(perms), matched.objective, matched.start_objective,
                     matched.n_iter, steps > 0, losses, time.perf_counter() - started, method)
