"""Singular values under permutation and the alignment R of Ito et al."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoperm.evaluate import singular_analyses, singular_analysis, singular_value_change, weight_matrices
from autoperm.spec import Member, PermutationGroup, PermutationSpec, apply_permutation, random_permutation


def mlp_spec(state_dict: dict[str, torch.Tensor], depth: int) -> PermutationSpec:
    """Hand-written spec of :class:`autoperm.models.MLP` (one group per hidden layer)."""
    groups = []
    for index in range(depth):
        following = f"layers.{index + 1}.weight" if index + 1 < depth else "head.weight"
        groups.append(
            PermutationGroup(
                name=f"hidden{index}",
                size=state_dict[f"layers.{index}.weight"].shape[0],
                members=(
                    Member(param=f"layers.{index}.weight", axis=0),
                    Member(param=f"layers.{index}.bias", axis=0),
                    Member(param=following, axis=1),
                ),
            )
        )
    return PermutationSpec(groups=tuple(groups), shapes={k: tuple(v.shape) for k, v in state_dict.items()})


def conv_state_dict(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3))
    return net.state_dict()


def conv_spec(state_dict: dict[str, torch.Tensor]) -> PermutationSpec:
    group = PermutationGroup(
        name="c",
        size=8,
        members=tuple(Member(param=p, axis=0) for p in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"))
        + (Member(param="3.weight", axis=1),),
    )
    return PermutationSpec(groups=(group,), shapes={k: tuple(v.shape) for k, v in state_dict.items()})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_singular_values_are_invariant_under_random_spec_permutations(seed):
    from autoperm.models import MLP

    torch.manual_seed(seed)
    sd = MLP(20, hidden=32, depth=3, num_classes=5).state_dict()
    spec = mlp_spec(sd, depth=3)
    permuted = apply_permutation(spec, random_permutation(spec, seed=seed + 10), sd)
    assert any(not torch.equal(sd[k], permuted[k]) for k in sd)  # the permutation did something
    for name, matrix in weight_matrices(sd).items():
        s = torch.linalg.svdvals(matrix)
        s_permuted = torch.linalg.svdvals(weight_matrices(permuted)[name])
        torch.testing.assert_close(s, s_permuted, rtol=1e-10, atol=1e-10)
    assert singular_value_change(spec, sd, seed=seed) < 1e-10


def test_conv_weights_are_reshaped_out_by_in_kernel_and_checked():
    sd = conv_state_dict(0)
    matrices = weight_matrices(sd)
    assert set(matrices) == {"0.weight", "3.weight"}  # 1-dim BN vectors and stats left out
    assert tuple(matrices["0.weight"].shape) == (8, 27)
    assert tuple(matrices["3.weight"].shape) == (5, 72)
    assert singular_value_change(conv_spec(sd), sd, seed=3) < 1e-10


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_alignment_is_one_for_identical_weights(gamma):
    sd = conv_state_dict(0)
    analysis = singular_analysis(conv_spec(sd), sd, sd, gamma=gamma)
    assert analysis.alignment == pytest.approx(1.0, abs=1e-9)
    assert all(layer.alignment == pytest.approx(1.0, abs=1e-9) for layer in analysis.layers)
    assert analysis.invariance_error is not None and analysis.invariance_error < 1e-10


def test_alignment_is_near_zero_for_independent_random_weights():
    generator = torch.Generator().manual_seed(0)
    sd_a = {"w1": torch.randn(256, 128, generator=generator), "w2": torch.randn(64, 256, generator=generator)}
    sd_b = {"w1": torch.randn(256, 128, generator=generator), "w2": torch.randn(64, 256, generator=generator)}
    analysis = singular_analysis(None, sd_a, sd_b, gamma=0.3)
    assert abs(analysis.alignment) < 0.05
    assert analysis.invariance_error is None
    assert all(layer.num_vectors > 10 for layer in analysis.layers)


def test_alignment_by_hand_on_a_rank_one_pair():
    # A = e1 e1^T and B = e2 e1^T: orthogonal left vectors, so R = 0.
    a = torch.zeros(3, 3)
    a[0, 0] = 1.0
    b = torch.zeros(3, 3)
    b[1, 0] = 1.0
    r = singular_analysis(None, {"w": a}, {"w": b}, gamma=0.5).layers[0]
    assert r.num_vectors == 1 and r.alignment == pytest.approx(0.0)
    mixed = torch.zeros(3, 3)
    mixed[0, 0], mixed[1, 0] = 0.6, 0.8  # u_B = (0.6, 0.8, 0), v_B = e1 -> R = 0.6
    r = singular_analysis(None, {"w": a}, {"w": mixed}, gamma=0.5).layers[0]
    assert r.alignment == pytest.approx(0.6)


def test_alignment_recovers_after_undoing_a_permutation_and_gamma_counts():
    from autoperm.models import MLP
    from autoperm.spec import invert_permutation

    torch.manual_seed(0)
    sd = MLP(20, hidden=64, depth=2, num_classes=5).state_dict()
    spec = mlp_spec(sd, depth=2)
    perms = random_permutation(spec, seed=1)
    permuted = apply_permutation(spec, perms, sd)
    scrambled = singular_analysis(spec, sd, permuted, gamma=0.0)
    assert scrambled.layers[0].alignment < 0.3  # hidden units shuffled
    restored = apply_permutation(spec, invert_permutation(spec, perms), permuted)
    assert singular_analysis(spec, sd, restored, gamma=0.0).alignment == pytest.approx(1.0)
    wide = singular_analysis(spec, sd, sd, gamma=0.0)
    narrow = singular_analysis(spec, sd, sd, gamma=0.9)
    assert all(w.num_vectors >= n.num_vectors for w, n in zip(wide.layers, narrow.layers))
    assert wide.layers[0].num_vectors == 20  # rank of a 64 x 20 matrix
    assert singular_analysis(spec, sd, sd).to_dict(spectra=False)["layers"][0].keys() >= {"alignment", "num_vectors"}


def test_pooled_alignment_matches_a_hand_computation_at_both_gammas():
    # Layer w1: A = e1 e1^T, B = (0.6, 0.8, 0) e1^T: one direction at any gamma > 0, sum 0.6.
    # Layer w2: A = B = diag(1, 0.4): two directions at gamma 0.3 (sum 2), one at gamma 0.5 (sum 1).
    a1 = torch.zeros(3, 3)
    a1[0, 0] = 1.0
    b1 = torch.zeros(3, 3)
    b1[0, 0], b1[1, 0] = 0.6, 0.8
    w2 = torch.diag(torch.tensor([1.0, 0.4]))
    sd_a, sd_b = {"w1": a1, "w2": w2}, {"w1": b1, "w2": w2.clone()}
    both = singular_analyses(None, sd_a, sd_b, gammas=(0.3, 0.5))
    assert [layer.num_vectors for layer in both[0.3].layers] == [1, 2]
    assert both[0.3].alignment == pytest.approx((0.6 + 2.0) / (1 + 2))  # pooled: sum over layers / sum n_l
    assert both[0.3].mean_layer_alignment == pytest.approx((0.6 + 1.0) / 2)  # mean of R_l
    assert [layer.num_vectors for layer in both[0.5].layers] == [1, 1]
    assert both[0.5].alignment == pytest.approx((0.6 + 1.0) / 2)
    for gamma, analysis in both.items():
        single = singular_analysis(None, sd_a, sd_b, gamma=gamma)
        assert single.alignment == pytest.approx(analysis.alignment)
        assert single.to_dict(spectra=False) == analysis.to_dict(spectra=False)
    with pytest.raises(ValueError, match="gamma"):
        singular_analyses(None, sd_a, sd_b, gammas=(0.3, 1.0))
