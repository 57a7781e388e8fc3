"""Checking a spec: a random element of every group's kind must leave the model's outputs unchanged."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from autoperm.errors import SpecError
from autoperm.spec import PermutationSpec, apply_permutation, apply_transform, random_permutation, random_transform
from autoperm.spec.transform import transform_kind
from autoperm.trace import EvalMode
from autoperm.trace.common import normalise_inputs

__all__ = ["VerifyReport", "verify_spec", "model_outputs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_spec`.

    Attributes:
        max_abs_diff: largest absolute difference over all floating outputs.
        max_rel_diff: ``max_abs_diff`` divided by the largest absolute output value.
        passed: whether ``max_abs_diff <= atol + rtol * max |output|``.
        groups: number of active groups that were permuted.
        permuted_tensors: state-dict entries the permutation moved.
        seed: seed of the random permutation.
        kinds: how many groups were checked with a transform of each kind beyond permutations.
        failed_groups: when the check fails, the groups whose transform alone changes the
            outputs (a kind the model does not admit); empty when the permutations fail.
    """

    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    groups: int
    permuted_tensors: int
    seed: int
    tolerance: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    failed_groups: tuple[str, ...] = ()


def model_outputs(model: nn.Module, example_inputs: Any, state_dict: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The floating-point tensors ``model`` returns (eval mode, no grad), optionally with other weights."""
    args, kwargs = normalise_inputs(example_inputs)
    with EvalMode(model), torch.no_grad():
        model.train().eval()  # modules that cache tensors derived from their weights in eval mode
        # (timm's attention-bias cache) rebuild them; EvalMode restores every flag afterwards
        if state_dict is None:
            result = model(*args, **kwargs)
        else:
            result = torch.func.functional_call(model, dict(state_dict), args, kwargs, tie_weights=False, strict=False)
    if hasattr(result, "to_tuple"):  # transformers' ModelOutput
        result = result.to_tuple()
    leaves, _ = tree_flatten(result)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


TOLERANCES = {"float64": (1e-8, 1e-6), "float32": (1e-5, 1e-4)}
"""Default ``(atol, rtol)`` per precision. In float32, rounding in deep random-init nets reaches
1e-2; in float64 an unsound group still shows at 1e-3 and more, while models that compute parts
in float32 whatever their weights (Hugging Face's RMSNorm and rotary embeddings) stay near 1e-7."""


def verify_spec(
    model: nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    precision: Literal["float64", "float32"] = "float64",
    kinds: Iterable[str] | None = None,
) -> VerifyReport:
    """Transform the model's weights by a random element of each group's kind and compare outputs.

    Every group is permuted at random; a group whose ``kind`` is larger also moves by a random
    transform of that kind (:func:`autoperm.spec.random_transform`: positive scales, Haar
    orthogonal maps, well-conditioned invertible maps). A sound spec gives the same outputs up
    to float rounding. The check runs in float64 by default (weights and floating inputs cast;
    the model itself is not modified), where an unsound group stands far above rounding;
    ``precision="float32"`` runs the model as it is. The model is run in eval mode (BatchNorm
    running statistics included). When the check fails, each group's transform is tried alone
    to name the groups that do not admit their declared kind (``failed_groups``).

    Args:
        model: the model the spec describes.
        spec: the spec to check (inferred or loaded from YAML).
        example_inputs: a tensor, tuple of positional inputs or dict of keyword inputs.
        seed: seed of the random permutation.
        atol, rtol: pass if ``max_abs_diff <= atol + rtol * max |output|`` (defaults per
            precision in ``TOLERANCES``).
        precision: ``"float64"`` (default) or ``"float32"`` (the model's own dtype).
        kinds: the kinds to draw (default: every group's own); ``["permutation"]`` checks
            permutations only.

    Raises:
        SpecError: the spec does not match the model's state dict.
    """
    given = (atol, rtol)
    default_atol, default_rtol = TOLERANCES[precision]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    state_dict = model.state_dict()
    spec.check_state_dict(state_dict, what="model's state dict")
    perms = random_permutation(spec, seed=seed)
    if precision == "float64":
        state_dict = {k: v.double() if v.is_floating_point() else v for k, v in state_dict.items()}
        example_inputs = tree_map(lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x, example_inputs)
    permuted = apply_permutation(spec, perms, state_dict)
    try:
        reference = model_outputs(model, example_inputs, state_dict if precision == "float64" else None)
    except RuntimeError as error:  # a model that cannot run in float64 (dtype checks, kernels)
        if precision != "float64":
            raise
        logger.warning("the model does not run in float64 (%s); verifying in its own precision", error)
        return verify_spec(model, spec, example_inputs, seed, *given, precision="float32", kinds=kinds)
    transforms = {name: t for name, t in random_transform(spec, seed=seed, kinds=kinds).items() if t.is_floating_point()}
    transformed = apply_transform(spec, transforms, permuted) if transforms else permuted
    max_abs, scale = _difference(reference, model_outputs(model, example_inputs, transformed))
    tolerance = atol + rtol * scale
    failed: list[str] = []
    if max_abs > tolerance and transforms:
        permutations_pass = _difference(reference, model_outputs(model, example_inputs, permuted))[0] <= tolerance
        for name in transforms if permutations_pass else ():
            alone = apply_transform(spec, {name: transforms[name]}, permuted)
            if _difference(reference, model_outputs(model, example_inputs, alone))[0] > tolerance:
                failed.append(name)
    moved = sum(1 for name in spec.members_by_param if transformed[name] is not state_dict[name])
    drawn: dict[str, int] = {}
    for name, transform in transforms.items():
        kind = transform_kind(spec, spec[name], transform)
        drawn[kind] = drawn.get(kind, 0) + 1
    return VerifyReport(
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / scale if scale else max_abs,
        passed=max_abs <= tolerance,
        groups=len(perms),
        permuted_tensors=moved,
        seed=seed,
        tolerance=tolerance,
        details={"precision": precision},
        kinds=drawn,
        failed_groups=tuple(failed),
    )


def _difference(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference between two lists of outputs, and the largest absolute reference value.

    Raises:
        SpecError: the model returned no floating-point outputs, or a different number of them.
    """
    if len(reference) != len(candidate) or not reference:
        raise SpecError("the model returned no floating-point outputs to compare")
    max_abs = 0.0
    scale = 0.0
    for ref, cand in zip(reference, candidate):
        if ref.numel():
            max_abs = max(max_abs, (ref.double() - cand.double()).abs().max().item())
            scale = max(scale, ref.double().abs().max().item())
    return max_abs, scale
