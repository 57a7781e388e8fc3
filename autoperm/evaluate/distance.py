"""L2 distance between two models' parameters (Ito et al., arXiv 2402.04051, finding 1).

Weight matching lowers this distance only modestly while the loss barrier collapses, so linear
mode connectivity is not explained by the models simply moving closer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from autoperm.errors import AutopermError
from autoperm.evaluate.barrier import check_compatible

__all__ = ["Distance", "l2_distance", "is_statistic"]

_STATISTIC_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_statistic(name: str, tensor: torch.Tensor) -> bool:
    """Whether a state-dict entry is a statistic rather than a learned parameter.

    Statistics are BatchNorm's ``running_mean`` / ``running_var`` / ``num_batches_tracked`` and
    every non-floating tensor (counters, index buffers).
    """
    return not tensor.is_floating_point() or name.rsplit(".", 1)[-1] in _STATISTIC_SUFFIXES


@dataclass(frozen=True)
class Distance:
    """How far apart two parameter vectors are.

    Attributes:
        absolute: ``||theta_A - theta_B||_2`` over all parameters.
        relative: ``absolute / sqrt((||theta_A||^2 + ||theta_B||^2) / 2)``: 0 for identical models,
            about ``sqrt(2)`` for uncorrelated ones of equal norm. A permutation of B changes
            neither norm, so before/after matching the ratio moves exactly as ``absolute``.
        norm_a: ``||theta_A||_2``.
        norm_b: ``||theta_B||_2``.
    """

    absolute: float
    relative: float
    norm_a: float
    norm_b: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def l2_distance(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor]) -> Distance:
    """Euclidean distance between the learned parameters of two state dicts.

    BatchNorm running statistics and integer buffers are left out (see :func:`is_statistic`):
    they are derived from data, not learned, and their scale would swamp the weights.

    Args:
        sd_a: state dict of model A.
        sd_b: state dict of model B (e.g. after alignment to A), same names and shapes.

    Returns:
        A :class:`Distance`.

    Raises:
        AutopermError: the names or shapes differ, or there is no parameter to compare.

    Example:
        >>> l2_distance(sd_a, apply_permutation(spec, result.perms, sd_b)).absolute
    """
    check_compatible(sd_a, sd_b)
    squared = norm_a = norm_b = 0.0
    compared = 0
    for name, a in sd_a.items():
        if is_statistic(name, a):
            continue
        a64 = a.detach().to(torch.float64)
        b64 = sd_b[name].detach().to(device=a.device, dtype=torch.float64)
        squared += float(torch.sum((a64 - b64) ** 2))
        norm_a += float(torch.sum(a64**2))
        norm_b += float(torch.sum(b64**2))
        compared += 1
    if compared == 0:
        raise AutopermError("the state dicts hold no floating-point parameters to compare")
    absolute = math.sqrt(squared)
    scale = math.sqrt((norm_a + norm_b) / 2)
    return Distance(
        absolute=absolute,
        relative=absolute / scale if scale > 0 else 0.0,
        norm_a=math.sqrt(norm_a),
        norm_b=math.sqrt(norm_b),
    )
