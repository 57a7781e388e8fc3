"""Straight-through estimator for permutation matching (Git Re-Basin, arXiv 2209.04836, Sec. 3.3).

Ito et al. (arXiv 2402.04051) compare its permutations with weight matching's: STE finds
permutations tuned to one pair of models, with lower midpoint loss but less singular-vector
alignment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from autoperm.data import iter_batches
from autoperm.errors import SolverError
from autoperm.solvers.result import MatchingResult, check_state_dicts, is_cost_tensor
from autoperm.solvers.weight_matching import weight_matching
from autoperm.spec import PermutationSpec, apply_permutation

__all__ = ["ste_matching", "midpoint_loss"]

logger = logging.getLogger(__name__)

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EpochCallback = Callable[[int, float], None]
"""Called after every epoch with the epoch number (from 1) and the midpoint loss of its projection."""


def ste_matching(
    spec: PermutationSpec,
    model: nn.Module,
    state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor],
    data: Any,
    loss_fn: LossFunction | None = None,
    epochs: int = 5,
    lr: float = 1e-2,
    momentum: float = 0.9,
    batch_size: int = 500,
    seed: int = 0,
    device: str | torch.device = "cpu",
    callback: EpochCallback | None = None,
) -> MatchingResult:
    """Learn permutations of B that minimise the loss at the midpoint with A (straight-through).

    A learnable copy ``theta~`` of the cost tensors starts at ``theta_A``. Each step projects it
    onto the closest permutation of ``theta_B`` (weight matching of ``theta~`` against
    ``theta_B``, warm-started from the previous permutation), evaluates the loss of the midpoint
    ``(theta_A + pi(theta_B)) / 2`` on one batch with :func:`torch.func.functional_call`, and
    back-propagates straight through the projection: the midpoint uses
    ``pi(theta_B) + (theta~ - theta~.detach())``. SGD with momentum updates ``theta~``. After
    every epoch the current projection is scored by its mean midpoint loss over ``data``; the
    permutation with the lowest such loss (the weight-matching start included) is returned.

    BatchNorm: the midpoint model runs in *train* mode, so BatchNorm layers normalise with the
    statistics of each batch (the stored running statistics of an interpolated model are not
    valid for it). The running statistics passed in are the averages of A's and pi(B)'s, copied
    so that the in-place update BatchNorm makes in train mode touches neither input. Models
    without BatchNorm (or dropout) behave as in eval mode except for dropout, which stays active.

    Args:
        spec: the permutation spec of the architecture.
        model: the module; only its structure is used (its own weights are ignored).
        state_dict_a: the reference model's state dict.
        state_dict_b: the state dict to permute.
        data: ``(inputs, targets)`` batches: a DataLoader, an iterable, or one tensor pair
            (cut into batches of ``batch_size``). Must be iterable more than once.
        loss_fn: ``loss_fn(outputs, targets)``; default cross-entropy.
        epochs: passes over ``data``.
        lr: SGD learning rate (Git Re-Basin used 1e-2 for MLPs).
        momentum: SGD momentum.
        batch_size: batch size when ``data`` is a tensor pair.
        seed: seeds weight matching's group order.
        device: where the model and the matmuls run.
        callback: progress hook, see :data:`EpochCallback`.

    Returns:
        A :class:`MatchingResult`: ``loss`` is the best midpoint loss, ``history`` the midpoint
        loss of the weight-matching start followed by one value per epoch, ``objective`` the
        weight-matching objective ``<A, pi(B)>`` of the returned permutation.

    Raises:
        SolverError: mismatched state dicts or empty data.
    """
    check_state_dicts(spec, [state_dict_a, state_dict_b])
    device = torch.device(device)
    loss_fn = loss_fn or nn.functional.cross_entropy
    model = model.to(device).train()
    a = {name: t.detach().to(device) for name, t in state_dict_a.items()}
    b = {name: t.detach().to(device) for name, t in state_dict_b.items()}
    learnable = [name for name in spec.members_by_param if is_cost_tensor(name, a[name])]
    theta = {name: a[name].clone().requires_grad_(True) for name in learnable}
    optimizer = torch.optim.SGD(list(theta.values()), lr=lr, momentum=momentum)

    def project(perms: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        target = {**a, **{name: t.detach() for name, t in theta.items()}}
        return weight_matching(spec, target, b, init_perms=perms, seed=seed, device=device).perms

    perms = project(None)
    best_perms = perms
    best_loss = midpoint_loss(spec, model, a, b, perms, data, loss_fn, batch_size, device)
    history = [best_loss]
    logger.info("STE: weight-matching start has midpoint loss %.6g", best_loss)
    for epoch in range(1, epochs + 1):
        steps = 0
        for inputs, targets in iter_batches(data, batch_size):
            perms = project(perms)
            permuted_b = apply_permutation(spec, perms, b)
            parameters = _midpoint(a, permuted_b)
            for name, value in theta.items():
                parameters[name] = (a[name] + permuted_b[name] + (value - value.detach())) / 2
            outputs = functional_call(model, parameters, (inputs.to(device),))
            loss = loss_fn(outputs, targets.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        if steps == 0:
            raise SolverError("STE got no batches from data; give an iterable of (inputs, targets)")
        perms = project(perms)
        epoch_loss = midpoint_loss(spec, model, a, b, perms, data, loss_fn, batch_size, device)
        history.append(epoch_loss)
        logger.debug("STE epoch %d: midpoint loss %.6g", epoch, epoch_loss)
        if epoch_loss < best_loss:
            best_loss, best_perms = epoch_loss, perms
        if callback is not None:
            callback(epoch, epoch_loss)
    objective = weight_matching(spec, a, b, init_perms=best_perms, max_iter=0).objective
    logger.info("STE: best midpoint loss %.6g (start %.6g)", best_loss, history[0])
    return MatchingResult(
        perms=best_perms, objective=objective, n_iter=epochs, converged=True, history=history, loss=best_loss
    )


def _midpoint(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(a + b) / 2`` for floating-point entries (fresh tensors); others taken from ``a``, copied."""
    return {name: (t + b[name]) / 2 if t.is_floating_point() else t.clone() for name, t in a.items()}


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
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = torch.device(device)
    parameters = _midpoint(
        {k: v.to(device) for k, v in state_dict_a.items()},
        {k: v.to(device) for k, v in apply_permutation(spec, perms, state_dict_b).items()},
    )
    model = model.to(device).train()
    total, count = 0.0, 0
    for inputs, targets in iter_batches(data, batch_size):
        batch = {k: v.clone() for k, v in parameters.items()}
        outputs = functional_call(model, batch, (inputs.to(device),))
        total += float(loss_fn(outputs, targets.to(device))) * inputs.shape[0]
        count += inputs.shape[0]
    if count == 0:
        raise SolverError("no batches in data; give an iterable of (inputs, targets)")
    return total / count
