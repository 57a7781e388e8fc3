"""A few representative timm models: sound specs in float64 and exact planted recovery.

The full sweep over one model per timm family is ``benchmarks/zoo_sweep.py``; these are small,
fast members of the architecture kinds it covers: a ResNet (BatchNorm, residual streams), a
DeiT (fused-qkv attention heads), MobileNetV3 (depthwise convs, squeeze-and-excitation), PiT
(channel-multiplier grouped convs between stages), ConvNeXt (LayerNorm, layer scale) and a
FastViT (reparameterisable branches, nested groups). Random init, no downloads, small inputs.

Skipped where timm is not installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.conftest import optional_import

timm = optional_import("timm")

import autoperm  # noqa: E402
from tests.conftest import perturb_  # noqa: E402

MODELS: dict[str, tuple[dict[str, object], tuple[int, int, int]]] = {
    "resnet10t": ({}, (3, 64, 64)),
    "deit_tiny_patch16_224": ({"img_size": 64, "depth": 4}, (3, 64, 64)),
    "mobilenetv3_small_050": ({}, (3, 64, 64)),
    "pit_ti_224": ({"img_size": 64}, (3, 64, 64)),
    "convnext_atto": ({}, (3, 64, 64)),
    "fastvit_t8": ({}, (3, 64, 64)),
}


_SPECS: dict[str, autoperm.PermutationSpec] = {}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, autoperm.PermutationSpec]:
    """A fresh model (perturbed, eval mode), an example input and the spec (traced once per model)."""
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = perturb_(timm.create_model(name, pretrained=False, **kwargs).eval(), scale=0.02)
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))
    if name not in _SPECS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SPECS[name] = autoperm.infer_spec(model, x)
    return model, x, _SPECS[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_is_sound_in_float64(name: str) -> None:
    """Random permutations from the spec leave the float64 outputs unchanged (1e-9 relative)."""
    model, x, spec = build(name)
    assert spec.active_groups, f"{name}: no permutation group found"
    model, x = model.double(), x.double()
    state = model.state_dict()
    with torch.no_grad():
        reference = model(x)
        for seed in (0, 1):
            model.load_state_dict(autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=seed), state))
            error = float((model(x) - reference).abs().max() / reference.abs().max())
            assert error < 1e-9, f"{name}, seed {seed}: relative output change {error:.2e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_planted_permutation_is_recovered_exactly(name: str) -> None:
    """Weight matching maps a permuted copy back onto the original, and reports its true objective."""
    model, _, spec = build(name)
    state = model.state_dict()
    permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=1), state)
    result = autoperm.weight_matching(spec, state, permuted)
    recovered = autoperm.apply_permutation(spec, result.perms, permuted)
    wrong = [k for k in state if not torch.equal(recovered[k], state[k])]
    assert not wrong, f"{name}: {len(wrong)} tensors differ after matching, e.g. {wrong[:3]}"
    optimum = sum(
        float((t.double() ** 2).sum())
        for k, t in state.items()
        if k in spec.members_by_param and t.is_floating_point() and "running_" not in k
    )
    assert result.objective == pytest.approx(optimum, rel=1e-9)
    assert result.converged
