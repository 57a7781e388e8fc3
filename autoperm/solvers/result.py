"""Result objects the solvers return, and the state-dict and progress checks they share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from autoperm.errors import SolverError
from autoperm.spec import PermutationSpec

__all__ = ["MatchingResult", "MergeResult", "check_state_dicts", "is_cost_tensor", "is_improvement"]

_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class MatchingResult:
    """What a matching solver found: permutations of model B that align it to model A.

    Attributes:
        perms: ``{group name: LongTensor}``; apply with :func:`autoperm.apply_permutation` to B.
        objective: ``sum <W_A, pi(W_B)>_F`` over the cost tensors (weights, biases, norm
            scale/shift; not BatchNorm running statistics) at ``perms``.
        n_iter: sweeps (weight matching) or epochs (STE) run.
        converged: whether the solver stopped on its own criterion before its iteration limit.
        history: weight matching: the exact objective at the start and after every sweep
            (every move is measured on the tensors it touches); STE: the
            midpoint loss of the weight-matching start and of the projection after every epoch.
        loss: the midpoint loss of ``perms`` (data-driven solvers only).
        fallback_groups: groups solved by weight matching because no activation shows them
            (activation matching only).
    """

    perms: dict[str, torch.Tensor]
    objective: float
    n_iter: int
    converged: bool
    history: list[float] = field(default_factory=list)
    loss: float | None = None
    fallback_groups: tuple[str, ...] = ()


@dataclass
class MergeResult:
    """Several models merged into one.

    Attributes:
        state_dict: the merged model: the plain mean of the aligned models.
        perms: one ``{group name: LongTensor}`` per input model, in input order; the first
            model's frame is kept, so its permutations are the identity.
        n_iter: rounds (MergeMany) or aligned models (anchor scheme).
        converged: whether MergeMany stopped because no model improved.
        history: MergeMany: the summed objective of every model against the mean of the others
            after each round; anchor scheme: each aligned model's objective against the anchor.
    """

    state_dict: dict[str, torch.Tensor]
    perms: list[dict[str, torch.Tensor]]
    n_iter: int
    converged: bool
    history: list[float] = field(default_factory=list)


def is_cost_tensor(name: str, tensor: torch.Tensor) -> bool:
    """Whether a state-dict entry enters the weight-matching cost.

    Weights, biases and norm scale/shift do; BatchNorm running statistics and integer tensors do
    not (they are still permuted when a permutation is applied).
    """
    return tensor.is_floating_point() and name.rsplit(".", 1)[-1] not in _RUNNING_STATISTICS


def is_improvement(gain: float, reference: float, tol: float) -> bool:
    """Whether ``gain`` improves an objective of about ``reference`` by more than ``tol``, relatively.

    The one progress test of the solvers: a move, a LAP solution or a MergeMany round counts
    only when it gains more than ``tol * max(1, |reference|)``.
    """
    return gain > tol * max(1.0, abs(reference))


def check_state_dicts(
    spec: PermutationSpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
) -> None:
    """Raise :class:`SolverError` unless all state dicts share keys and shapes and fit ``spec``.

    Args:
        spec: the permutation spec.
        state_dicts: the state dicts to compare; the first is the reference.
        names: how to call each state dict in messages (default ``A``, ``B``, ...).

    Raises:
        SolverError: naming the first few missing, extra or mis-shaped keys.
    """
    names = list(names) if names is not None else [chr(ord("A") + i) for i in range(len(state_dicts))]
    reference, reference_name = state_dicts[0], names[0]
    expected_shapes = dict(spec.shapes) or {k: tuple(v.shape) for k, v in reference.items()}
    for param in spec.members_by_param:
        if param not in expected_shapes:
            expected_shapes[param] = ()
    for state_dict, name in zip(state_dicts, names):
        problems: list[str] = []
        for key, shape in expected_shapes.items():
            if key not in state_dict:
                problems.append(f"missing {key!r}")
            elif shape and tuple(state_dict[key].shape) != tuple(shape):
                problems.append(f"{key!r} has shape {list(state_dict[key].shape)}, expected {list(shape)}")
        problems.extend(f"unexpected {key!r}" for key in state_dict if key not in expected_shapes)
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            against = "the permutation spec" if spec.shapes else f"state dict {reference_name}"
            raise SolverError(
                f"state dict {name} does not match {against}: {shown}{more}. "
                "Are both checkpoints of the same architecture, and the spec made for it?"
            )
