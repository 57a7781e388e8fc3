"""Learned refinement of an alignment on data: continuous maps by a parametrisation, permutations straight-through.

Theus et al. ("Generalized Linear Mode Connectivity for Transformers", arXiv 2506.22712) finish
their pipeline with a learned merger: the maps that align B to A are trained on the loss of the
midpoint ``(theta_A + T(theta_B)) / 2``. :func:`refine` does this for any spec:

- each orthogonal (or invertible, kept orthogonal here) map ``T_0`` becomes ``exp(K - K^T) T_0``
  with ``K`` learned from zero by Adam (a group that fixes the all-ones vector rotates only its
  complement);
- with ``permutations=True`` the permutation groups are learned too, by the straight-through
  estimator of Git Re-Basin (arXiv 2209.04836, Sec. 3.3): a learned copy ``theta~`` of the
  tensors they move starts at ``theta_A``; each step B is moved by the current continuous maps,
  the permutations are the weight matching of ``theta~`` against it (warm-started from the last
  step's), and the midpoint uses ``pi(B) + (theta~ - sg(theta~))``, so its value is the moved B
  and its gradient reaches both ``theta~`` and the continuous maps.

Within-head maps follow their head: while the head permutation changes, each head's map is kept
for the head of B it was learned on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from autoperm.errors import SolverError
from autoperm.solvers.result import is_cost_tensor
from autoperm.solvers.ste import LossFunction, _shuffled
from autoperm.solvers.weight_matching import weight_matching
from autoperm.spec import PermutationSpec, apply_permutation
from autoperm.spec.transform import apply_transform, ones_basis

__all__ = ["LossFunction", "refine"]

logger = logging.getLogger(__name__)

def refine(
    spec: PermutationSpec,
    model: nn.Module,
    state_dict_a: Mapping[str, torch.Tensor],
    state_dict_b: Mapping[str, torch.Tensor],
    transforms: Mapping[str, torch.Tensor],
    data: Any,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 256,
    loss_fn: LossFunction | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    permutations: bool = False,
    permutation_lr: float = 1e-3,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Learn the maps of ``transforms`` on the midpoint loss (see the module docstring).

    The model runs in train mode.

    Args:
        spec: the spec ``transforms`` belong to.
        model: a module of the architecture (its own weights are not used).
        state_dict_a: the reference model, in the coordinates of ``transforms``.
        state_dict_b: the model ``transforms`` act on.
        transforms: the starting transforms (LongTensor permutations, float matrices).
        data: ``(inputs, targets)``: a tensor pair (shuffled batches of ``batch_size``), or an
            iterable of batches (cycled).
        steps: Adam steps.
        lr: Adam's learning rate for the continuous maps.
        batch_size: for a tensor pair.
        loss_fn: the task loss (default: cross-entropy over the last axis).
        seed: seeds the batch order and the projections' group order.
        device: where the model runs.
        permutations: learn the permutations straight-through too (else they stay as given).
        permutation_lr: Adam's learning rate for the straight-through copy ``theta~`` (STE-MM: 1e-3).

    Returns:
        ``(transforms, batch losses)``: the learned transforms, of the same groups and forms.

    Raises:
        SolverError: no batches in ``data``, or a non-finite loss.

    Example:
        >>> learned, losses = refine(spec, model, sd_a, sd_b, found.transforms, (x, y), steps=300, permutations=True)
    """
    device = torch.device(device)
    loss_fn = loss_fn or _cross_entropy
    learned_perms = {name for name, t in transforms.items() if permutations and not t.is_floating_point() and spec[name].active}
    if not learned_perms and not any(t.is_floating_point() for t in transforms.values()):
        return dict(transforms), []
    maps = _ContinuousMaps(spec, transforms, learned_perms)
    kept = {name: t for name, t in transforms.items() if not t.is_floating_point() and name not in learned_perms}
    a = {k: v.to(device) for k, v in state_dict_a.items()}
    b = {k: v.to(device) for k, v in state_dict_b.items()}
    straight = _StraightThrough(spec, a, transforms, learned_perms, seed) if learned_perms else None
    groups = [{"params": list(maps.skews.values()), "lr": lr}]
    if straight is not None:
        groups.append({"params": list(straight.theta.values()), "lr": permutation_lr})
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    model = model.to(device).train()
    losses: list[float] = []
    batches = _cycle(data, batch_size, seed)
    for step in range(steps):
        inputs, targets = next(batches)
        moved = apply_transform(spec, {**kept, **maps.current()}, b)
        if straight is not None:
            moved = straight.moved(moved)
        middle = {k: (a[k] + moved[k]) / 2 if a[k].is_floating_point() else a[k] for k in a}
        loss = loss_fn(functional_call(model, middle, (inputs.to(device),), tie_weights=False), targets.to(device))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SolverError(f"refinement: the loss became {value} at step {step + 1}; lower lr (now {lr})")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(value)
    with torch.no_grad():
        continuous = maps.current()
        learned = {**kept, **continuous}
        if straight is not None:
            found = straight.project(apply_transform(spec, learned, b))
            learned.update({**found, **maps.in_place_of(found)})
    if losses:
        logger.info("refinement: batch loss %.4g -> %.4g in %d steps%s", losses[0], losses[-1], steps,
                    f" ({len(learned_perms)} permutation group(s) learned straight-through)" if learned_perms else "")
    return learned, losses


class _ContinuousMaps:
    """The learned orthogonal maps ``exp(K - K^T) T_0`` of every floating transform.

    A map fibred over a learned permutation (a within-head map under a learned head permutation)
    is kept per head of B, not per position: :meth:`current` gives it in B's head order (apply
    it before the heads move), :meth:`in_place_of` in the order of the final head permutation.
    """

    def __init__(self, spec: PermutationSpec, transforms: Mapping[str, torch.Tensor], learned_perms: set[str]):
        self.spec = spec
        self.starts: dict[str, torch.Tensor] = {}
        self.over: dict[str, str] = {}  # fibred map -> the learned permutation it is fibred over
        for name, transform in transforms.items():
            if not transform.is_floating_point():
                continue
            start = transform.to(torch.float64)
            base = spec[name].per
            if base in learned_perms:
                order = transforms[base]
                if order.dim() != 1:
                    raise SolverError(f"refinement: group {name!r} is fibred over {base!r}, itself fibred; "
                                      "learn without permutations=True")
                start = start[torch.argsort(order)]  # row j: the map of B's head j
                self.over[name] = base
            self.starts[name] = start
        self.skews = {name: torch.zeros(_skew_shape(spec, name, t), dtype=torch.float64, requires_grad=True)
                      for name, t in self.starts.items()}

    def current(self) -> dict[str, torch.Tensor]:
        return {name: _rotated(self.spec, name, self.skews[name], start) for name, start in self.starts.items()}

    def in_place_of(self, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The maps fibred over a learned permutation, reordered to follow ``perms``."""
        current = self.current()
        return {name: current[name][perms[base]] for name, base in self.over.items()}


class _StraightThrough:
    """The straight-through copy ``theta~`` of the tensors that the learned permutations move."""

    def __init__(self, spec: PermutationSpec, a: Mapping[str, torch.Tensor], transforms: Mapping[str, torch.Tensor],
                 learned_perms: set[str], seed: int):
        self.spec = spec.with_fixed(g.name for g in spec.groups if g.name not in learned_perms)
        self.perms = {name: transforms[name] for name in learned_perms}
        self.seed = seed
        moved = {m.param for g in self.spec.active_groups for m in g.members}
        self.theta = {name: a[name].detach().clone().requires_grad_(True) for name in sorted(moved)
                      if is_cost_tensor(name, a[name])}

    def project(self, moved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The permutations of ``moved`` closest to ``theta~`` (weight matching, warm-started)."""
        target = {name: t.detach() for name, t in moved.items()}
        theta = {name: self.theta.get(name, t) for name, t in target.items()}
        theta = {name: t.detach() for name, t in theta.items()}
        self.perms = weight_matching(self.spec, theta, target, init_perms=self.perms, seed=self.seed).perms
        return dict(self.perms)

    def moved(self, moved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``pi(moved)`` with the straight-through gradient into ``theta~``."""
        permuted = apply_permutation(self.spec, self.project(moved), moved)
        for name, copy in self.theta.items():
            permuted[name] = permuted[name] + (copy - copy.detach())
        return permuted


def _skew_shape(spec: PermutationSpec, name: str, start: torch.Tensor) -> tuple[int, ...]:
    size = start.shape[-1] - (1 if spec[name].fixes_ones else 0)
    return (*start.shape[:-2], size, size)


def _rotated(spec: PermutationSpec, name: str, skew: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``exp(K - K^T) T_0``, or ``H diag(1, exp(K - K^T)) H^T T_0`` for a group that fixes the ones vector."""
    rotation = torch.linalg.matrix_exp(skew - skew.transpose(-1, -2))
    if spec[name].fixes_ones:
        basis = ones_basis(start.shape[-1])
        full = torch.block_diag(torch.ones(1, 1, dtype=torch.float64), rotation)
        rotation = basis @ full @ basis.T
    return rotation @ start


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten())


def _cycle(data: Any, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(inputs, targets)`` batches: shuffled each pass for a tensor pair (as STE shuffles), cycled otherwise."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        found = False
        for batch in _shuffled(data, batch_size, generator):
            found = True
            yield batch
        if not found:
            raise SolverError("no batches in data; give an iterable of (inputs, targets)")
