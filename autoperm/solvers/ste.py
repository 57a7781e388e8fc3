"""Straight-through estimator for permutation matching (Git Re-Basin, arXiv 2209.04836, Sec. 3.3).

Two recipes in the literature, both thousands of steps, both supported:

- Git Re-Basin's ``src/mnist_mlp_ste2.py`` (github samuela/git-re-basin): SGD with momentum 0.9,
  lr 1e-2, batch 1000, 250 epochs of MNIST (15,000 steps); keeps the permutation whose batch
  loss was lowest (``optimizer="sgd", lr=1e-2, select="best"``).
- The follow-up code of Ito et al. (github e5-a/STE-MM, ``configs/rebasin/method/ste.yaml``,
  ``srcs/search/mult/ste.py``): Adam, lr 1e-3, batch 256, 10 epochs of MNIST (about 2,300
  steps); returns the final projection (the defaults here).

Ito et al. (arXiv 2402.04051) compare its permutations with weight matching's: STE finds
permutations tuned to one pair of models, with less singular-vector alignment.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from autoperm.data import iter_batches
from autoperm.errors import SolverError
from autoperm.solvers.lap import LapMethod
from autoperm.solvers.projection import ProjectionStatistics, WarmProjection
from autoperm.solvers.result import MatchingResult, check_state_dicts, is_cost_tensor
from autoperm.solvers.weight_matching import weight_matching
from autoperm.spec import PermutationSpec, apply_permutation, check_permutations

__all__ = ["SteResult", "ste_matching", "midpoint_loss"]

logger = logging.getLogger(__name__)

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EpochCallback = Callable[[int, float], None]
"""Called after every pass over the data with the epoch number (from 1) and its mean batch loss."""


@dataclass
class SteResult(MatchingResult):
    """What :func:`ste_matching` found, and how it ran.

    Besides :class:`MatchingResult`'s fields (``history``: the interpolated-model loss of every
    step's batch, evaluated at that step's projection before the update; ``n_iter``: the steps
    run; ``loss``: the mean midpoint loss of ``perms`` over the data):

    Attributes:
        steps: optimiser steps run.
        start_loss: mean midpoint loss over the data of the starting permutation (weight matching).
        selected: ``"final"`` or ``"best"``, how ``perms`` was chosen.
        selected_step: the step whose projection ``perms`` is (``steps`` for the final projection,
            which is made after the last update).
        changed_groups: groups whose permutation differs from the start.
        seconds: wall time of the optimisation loop.
        projection: how the per-step projections were made (LAPs solved or certified).
        learned: the learned copy ``theta~`` after the last step (cost tensors only); the final
            projection is the permutation of B closest to it.
    """

    steps: int = 0
    start_loss: float = math.nan
    selected: str = "final"
    selected_step: int = 0
    changed_groups: tuple[str, ...] = ()
    seconds: float = 0.0
    projection: ProjectionStatistics = field(default_factory=ProjectionStatistics)
    learned: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else math.nan


def ste_matching(
    spec: PermutationSpec,
    model: nn.Module,
    state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor],
    data: Any,
    loss_fn: LossFunction | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    momentum: float = 0.9,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    callback: EpochCallback | None = None,
    *,
    steps: int | None = None,
    optimizer: Literal["adam", "sgd"] = "adam",
    select: Literal["final", "best"] = "final",
    interpolation: Literal["midpoint", "random"] = "midpoint",
    init_perms: Mapping[str, torch.Tensor] | None = None,
    lap: LapMethod = "auto",
) -> SteResult:
    """Learn permutations of B that minimise the loss between A and B (straight-through).

    A learnable copy ``theta~`` of the cost tensors (weights, biases, norm scale/shift; not
    BatchNorm running statistics) starts at ``theta_A``. Each step projects it onto the closest
    permutation ``pi`` of ``theta_B`` (weight matching of ``theta~`` against ``theta_B``,
    warm-started from the previous step's permutation, see :class:`WarmProjection`), evaluates
    the task loss of ``(theta_A + pi(theta_B)) / 2`` on one batch, and back-propagates straight
    through the projection: the midpoint uses ``pi(theta_B) + (theta~ - sg(theta~))``, so its
    value is the permuted B and its gradient flows into ``theta~``. With
    ``interpolation="random"`` the point is ``(1 - t) theta_A + t pi(theta_B)`` at a fresh
    ``t ~ U(0, 1)`` each step (as STE-MM offers) instead of ``t = 1/2``.

    The result is STE's own permutation: the projection after the last update (``"final"``,
    STE-MM) or the projection with the lowest batch loss (``"best"``, Git Re-Basin); the
    weight-matching start is returned only if STE's projection is still there.

    BatchNorm: the interpolated model runs in *train* mode, so BatchNorm layers normalise with
    batch statistics; the running statistics passed in are averages of A's and pi(B)'s, copied
    every step, so neither input is touched. Dropout stays active.

    Args:
        spec: the permutation spec of the architecture.
        model: the module; only its structure is used (its own weights are ignored).
        state_dict_a: the reference model's state dict (unchanged).
        state_dict_b: the state dict to permute (unchanged).
        data: ``(inputs, targets)`` batches: a DataLoader, an iterable, or one tensor pair (cut
            into shuffled batches of ``batch_size`` every epoch). Must be iterable more than once.
        loss_fn: ``loss_fn(outputs, targets)``; default cross-entropy.
        epochs: passes over ``data`` (ignored when ``steps`` is given).
        lr: learning rate (STE-MM: Adam 1e-3; Git Re-Basin: SGD 1e-2).
        momentum: SGD momentum (``optimizer="sgd"`` only).
        batch_size: batch size when ``data`` is a tensor pair or a Dataset.
        seed: seeds the batch order (tensor pairs), the group order of the projections and ``t``.
        device: where the model and the matmuls run.
        callback: progress hook, see :data:`EpochCallback`.
        steps: run exactly this many optimiser steps, cycling through ``data`` as needed.
        optimizer: ``"adam"`` (default) or ``"sgd"`` (with ``momentum``).
        select: ``"final"`` (default) or ``"best"`` (lowest batch loss).
        interpolation: ``"midpoint"`` (default) or ``"random"``.
        init_perms: the starting permutation; default weight matching of A against B.
        lap: the linear assignment backend of that weight matching and of every projection
            (:func:`autoperm.solvers.lap.linear_assignment`).

    Returns:
        A :class:`SteResult`.

    Raises:
        SolverError: mismatched state dicts, no batches in ``data``, a non-finite loss, or an
            unknown ``optimizer`` / ``select`` / ``interpolation``.

    Complexity:
        Per step one forward and backward pass, plus per group one ``n x n`` cost matmul and an
        ``O(n^2)`` optimality check; an ``O(n^3)`` LAP only when the check fails.

    Example:
        >>> res = ste_matching(spec, model, sd_a, sd_b, (inputs, targets), steps=2000)
        >>> res.steps, res.history[-1], res.projection.lap_solves
    """
    _check_choice("optimizer", optimizer, ("adam", "sgd"))
    _check_choice("select", select, ("final", "best"))
    _check_choice("interpolation", interpolation, ("midpoint", "random"))
    check_state_dicts(spec, [state_dict_a, state_dict_b])
    device = torch.device(device)
    loss_fn = loss_fn or nn.functional.cross_entropy
    model = model.to(device).train()
    a = {name: t.detach().to(device) for name, t in state_dict_a.items()}
    b = {name: t.detach().to(device) for name, t in state_dict_b.items()}
    if init_perms is None:
        init_perms = weight_matching(spec, a, b, seed=seed, device=device, lap=lap).perms
    check_permutations(spec, init_perms)
    learnable = [name for name in spec.members_by_param if is_cost_tensor(name, a[name])]
    theta = {name: a[name].clone().requires_grad_(True) for name in learnable}
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(list(theta.values()), lr=lr)
    else:
        opt = torch.optim.SGD(list(theta.values()), lr=lr, momentum=momentum)
    projection = WarmProjection(spec, b, init_perms, seed=seed, device=device, lap=lap)
    generator = torch.Generator().manual_seed(seed)
    start_loss = midpoint_loss(spec, model, a, b, init_perms, data, loss_fn, batch_size, device)
    history: list[float] = []
    best_loss, best_perms, best_step = math.inf, dict(init_perms), 0
    total_steps = 0
    clock = time.perf_counter()
    for epoch, batches in enumerate(_epochs(data, batch_size, generator, epochs, steps), start=1):
        epoch_losses: list[float] = []
        for inputs, targets in batches:
            perms = projection.project(theta)
            t = float(torch.rand((), generator=generator)) if interpolation == "random" else 0.5
            parameters = _interpolate(a, projection.permuted, t)
            for name, learned in theta.items():
                straight_through = projection.permuted[name] + (learned - learned.detach())
                parameters[name] = (1 - t) * a[name] + t * straight_through
            outputs = functional_call(model, parameters, (inputs.to(device),), tie_weights=False)
            loss = loss_fn(outputs, targets.to(device))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SolverError(f"STE: the loss became {value} at step {total_steps + 1}; lower lr (now {lr})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_steps += 1
            history.append(value)
            epoch_losses.append(value)
            if value < best_loss:
                best_loss, best_perms, best_step = value, perms, total_steps
        if not epoch_losses:
            raise SolverError("STE got no batches from data; give an iterable of (inputs, targets)")
        logger.debug("STE epoch %d: mean batch loss %.6g", epoch, sum(epoch_losses) / len(epoch_losses))
        if callback is not None:
            callback(epoch, sum(epoch_losses) / len(epoch_losses))
    if total_steps == 0:
        raise SolverError("STE got no batches from data; give an iterable of (inputs, targets)")
    final_perms = projection.project(theta)
    seconds = time.perf_counter() - clock
    chosen, chosen_step = (final_perms, total_steps) if select == "final" else (best_perms, best_step)
    loss = midpoint_loss(spec, model, a, b, chosen, data, loss_fn, batch_size, device)
    objective = weight_matching(spec, a, b, init_perms=chosen, max_iter=0).objective
    changed = tuple(name for name, p in chosen.items() if not torch.equal(p, init_perms[name].to(p)))
    logger.info(
        "STE: %d steps in %.1f s (%.0f/s); midpoint loss %.6g -> %.6g; %d group(s) differ from the start; "
        "projection: %d LAP(s) solved, %d certified optimal",
        total_steps, seconds, total_steps / seconds if seconds else math.nan, start_loss, loss, len(changed),
        projection.statistics.lap_solves, projection.statistics.certified,
    )
    return SteResult(
        perms=chosen, objective=objective, n_iter=total_steps, converged=True, history=history, loss=loss,
        steps=total_steps, start_loss=start_loss, selected=select, selected_step=chosen_step,
        changed_groups=changed, seconds=seconds, projection=projection.statistics,
        learned={name: t.detach().clone() for name, t in theta.items()},
    )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SolverError(f"ste_matching: unknown {name} {value!r}; choose one of {list(allowed)}")


def _epochs(
    data: Any, batch_size: int, generator: torch.Generator, epochs: int, steps: int | None
) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """One batch iterator per epoch; with ``steps``, as many epochs as needed, the last cut short."""
    remaining = steps
    epoch = 0
    while (remaining is None and epoch < epochs) or (remaining is not None and remaining > 0):
        epoch += 1
        batches = _shuffled(data, batch_size, generator)
        if remaining is None:
            yield batches
            continue
        taken = _take(batches, remaining)
        yield taken
        if taken.count == 0:
            raise SolverError("STE got no batches from data; give an iterable of (inputs, targets)")
        remaining -= taken.count


class _take:
    """The first ``limit`` items of an iterator, counting how many were taken."""

    def __init__(self, items: Iterator[Any], limit: int):
        self.items, self.limit, self.count = items, limit, 0

    def __iter__(self) -> _take:
        return self

    def __next__(self) -> Any:
        if self.count >= self.limit:
            raise StopIteration
        item = next(self.items)
        self.count += 1
        return item


def _shuffled(data: Any, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``data``; a tensor pair is shuffled with ``generator`` (other forms shuffle themselves)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(x, torch.Tensor) for x in data):
        inputs, targets = data
        order = torch.randperm(inputs.shape[0], generator=generator)
        return iter_batches((inputs[order], targets[order]), batch_size)
    return iter_batches(data, batch_size)


def _interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """``(1 - t) a + t b`` for floating-point entries (fresh tensors; ``b`` may hold only some
    names, the rest taken from ``a``); other entries copied from ``a``."""
    return {
        name: (1 - t) * x + t * b.get(name, x) if x.is_floating_point() else x.clone() for name, x in a.items()
    }


@torch.no_grad()
def midpoint_loss(
    spec: PermutationSpec,
    model: nn.Module,
    state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    data: Any,
    loss_fn: LossFunction | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> float:
    """Mean loss over ``data`` of ``(theta_A + pi(theta_B)) / 2``, run as :func:`ste_matching` runs it.

    The model runs in train mode (BatchNorm uses batch statistics); the mean is weighted by batch size.

    Raises:
        SolverError: no batches in ``data``.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = torch.device(device)
    parameters = _interpolate(
        {k: v.to(device) for k, v in state_dict_a.items()},
        {k: v.to(device) for k, v in apply_permutation(spec, perms, state_dict_b).items()},
        0.5,
    )
    model = model.to(device).train()
    total, count = 0.0, 0
    for inputs, targets in iter_batches(data, batch_size):
        batch = {k: v.clone() for k, v in parameters.items()}
        outputs = functional_call(model, batch, (inputs.to(device),), tie_weights=False)
        total += float(loss_fn(outputs, targets.to(device))) * inputs.shape[0]
        count += inputs.shape[0]
    if count == 0:
        raise SolverError("no batches in data; give an iterable of (inputs, targets)")
    return total / count
