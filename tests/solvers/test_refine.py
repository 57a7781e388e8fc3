"""The learned refinement: permutations straight-through together with the continuous maps (float64)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

import autoperm
from autoperm.cli import cli
from autoperm.solvers.refine import refine
from autoperm.spec import apply_transform, random_transform
from tests.solvers.test_generalized import TinyTransformer, _model, _relative_error, _state
from tests.solvers.test_generalized_activation import MODEL


def _planted(seed: int):
    """B, the canonical spec, and A = T(B) for a random T of permutations and orthogonal maps."""
    model, spec, inputs = _model(seed, heads=2, norm="rms")
    canonical, b = autoperm.canonicalize(spec, _state(model))
    planted = random_transform(canonical, seed=seed + 1, kinds=["permutation", "orthogonal"])
    return model, canonical, apply_transform(canonical, planted, b), b, planted, inputs


def _heads_swapped(canonical, planted):
    """``planted`` with two heads of every head group swapped, each within-head map kept with its head of B."""
    start = dict(planted)
    for group in canonical.active_groups:
        if group.name.endswith(".heads"):
            swap = torch.tensor([1, 0])
            start[group.name] = planted[group.name][swap]
            for fibre in (g for g in canonical.active_groups if g.per == group.name):
                start[fibre.name] = planted[fibre.name][swap]
    return start


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_permutations_move_heads_with_their_within_head_maps(seed):
    """Started from the planted transform with two heads swapped (each head's map kept with its head
    of B), learning the permutations finds the planted heads and returns every within-head map at
    its head's new place: B is mapped exactly onto A. Without it the swap stays."""
    model, canonical, a, b, planted, _ = _planted(seed)
    start = _heads_swapped(canonical, planted)
    assert _relative_error(apply_transform(canonical, start, b), a) > 1e-2
    data = (torch.randn(8, 5, 3, dtype=torch.float64), torch.randn(8, 5, 4, dtype=torch.float64))
    learned, losses = refine(canonical, model, a, b, start, data, steps=0, permutations=True, loss_fn=F.mse_loss)
    assert losses == []
    for name, transform in planted.items():
        if not transform.is_floating_point():
            assert torch.equal(learned[name], transform), name
    assert _relative_error(apply_transform(canonical, learned, b), a) < 1e-9
    kept, _ = refine(canonical, model, a, b, start, data, steps=0, loss_fn=F.mse_loss)
    assert _relative_error(apply_transform(canonical, kept, b), a) > 1e-2


def test_joint_refinement_keeps_b_function_and_lowers_the_midpoint_loss():
    """Through `align`: after learning every map B still computes its function, and the batch
    midpoint loss falls (an independent pair, targets from A)."""
    model, spec, inputs = _model(3, heads=2, norm="layer")
    other, _, _ = _model(4, heads=2, norm="layer")
    a, b = _state(model), _state(other)
    data_inputs = torch.randn(64, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        targets = model(data_inputs)
    expected = other(inputs)
    result = autoperm.align(spec, a, b, symmetries="full", model=model, data=(data_inputs, targets), steps=30,
                            batch_size=64, loss_fn=F.mse_loss, learn_permutations=True)
    assert result.refined and len(result.losses) == 30
    assert result.losses[-1] < result.losses[0]
    other.load_state_dict(result.state_dict)
    assert torch.allclose(other(inputs), expected, atol=1e-9)
    assert all(not t.is_floating_point() for name, t in result.transforms.items() if name.endswith((".heads", ".up")))


def test_the_loss_gradient_reaches_the_straight_through_copy():
    """From the planted answer, one Adam step of a huge learning rate on ``theta~`` moves it far from
    A, so its projection leaves the planted permutations; with no gradient it would stay at A."""
    model, canonical, a, b, planted, _ = _planted(2)
    data = (torch.randn(8, 5, 3, dtype=torch.float64), torch.randn(8, 5, 4, dtype=torch.float64))
    learned, _ = refine(canonical, model, a, b, planted, data, steps=1, lr=0.0, permutations=True, permutation_lr=100.0,
                        loss_fn=F.mse_loss)
    changed = [name for name, t in planted.items() if not t.is_floating_point() and not torch.equal(learned[name], t)]
    assert changed
    assert _relative_error(apply_transform(canonical, learned, b), apply_transform(canonical, planted, b)) > 1e-3


def token_classes() -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(64, 5, 3)`` inputs and a class of 4 per token: the data of the CLI test (``--data``)."""
    generator = torch.Generator().manual_seed(12)
    return torch.randn(64, 5, 3, generator=generator), torch.randint(0, 4, (64, 5), generator=generator)


@pytest.mark.parametrize("keep", [False, True])
def test_cli_match_ste_with_symmetries_learns_every_map_and_keeps_b_function(tmp_path: Path, keep: bool):
    torch.manual_seed(0)
    model = TinyTransformer(heads=2, norm="layer")
    inputs = token_classes()[0][:4]
    a = _state(model)
    b = _state(TinyTransformer(heads=2, norm="layer"))
    autoperm.save_state_dict(a, tmp_path / "a.pt")
    autoperm.save_state_dict(b, tmp_path / "b.pt")
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(cli, ["match", *MODEL, "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"),
                                      "--method", "ste", "--symmetries", "full", "--steps", "4", "--data",
                                      "tests.solvers.test_refine:token_classes", "-o", str(out),
                                      *(["--keep-permutations"] if keep else [])],
                                standalone_mode=False, catch_exceptions=True)
    assert result.exception is None, result.output
    assert ("continuous maps learned for 4 steps" in result.output) == keep
    assert "maps learned for 4 steps" in result.output
    model.load_state_dict(autoperm.load_state_dict(out))
    aligned_outputs = model(inputs)
    model.load_state_dict(b)
    assert torch.allclose(aligned_outputs, model(inputs), atol=1e-4)
