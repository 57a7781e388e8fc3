"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from autoperm.spec import PermutationGroup, PermutationSpec

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def optional_import(name: str):
    """Import ``name`` or skip the test: also when an installed build fails to load (a torchvision
    built for another torch raises RuntimeError, not ImportError)."""
    try:
        return __import__(name)
    except Exception as error:  # noqa: BLE001 - any failure to load means the library is unusable here
        pytest.skip(f"{name} is not usable here: {type(error).__name__}", allow_module_level=True)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every floating state entry (zero-initialised layers would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.5)
    return model


@pytest.fixture
def perturb():
    return perturb_


def group_of(spec: PermutationSpec, param: str, axis: int) -> list[PermutationGroup]:
    """The active groups with a member on ``param``'s ``axis``."""
    return [g for g in spec.active_groups if any(m.param == param and m.axis == axis for m in g.members)]


def only_group(spec: PermutationSpec, param: str, axis: int) -> PermutationGroup:
    """The one active group on ``param``'s ``axis`` (fails the test if there are none or several)."""
    groups = group_of(spec, param, axis)
    assert len(groups) == 1, f"{param} axis {axis}: expected one group, got {[g.name for g in groups]}"
    return groups[0]
