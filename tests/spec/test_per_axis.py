"""Fibred groups whose parent units run along another axis of the tensor (``Member.per_axis``).

A hand-written mixture of experts with stacked weights ``up (experts, hidden, d)`` and
``down (experts, d, hidden)``: the experts are one group (the router's rows and the leading axis
of both stacks), and each expert's hidden units are its own permutation (a group fibred over the
experts, whose members run along axis 1 of ``up`` and axis 2 of ``down`` with the experts on
axis 0). The checks: the permuted model computes the same function in float64, the inverse and
composition laws, scales (the hidden activation is a ReLU), YAML round trips, validation of a
wrong ``per_axis`` and planted recovery by weight matching.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoperm.errors import SpecError
from autoperm.solvers import weight_matching
from autoperm.spec import (
    PermutationSpec,
    apply_permutation,
    apply_transform,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    member_matrix,
    random_permutation,
    random_transform,
)

EXPERTS, HIDDEN, WIDTH = 4, 6, 5


class StackedExperts(nn.Module):
    """Top-2 routing over experts stacked along axis 0, each a ReLU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        self.up = nn.Parameter(torch.randn(EXPERTS, HIDDEN, WIDTH))
        self.down = nn.Parameter(torch.randn(EXPERTS, WIDTH, HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.router(x).softmax(-1)
        weights, chosen = scores.topk(2, dim=-1)
        flat = chosen.reshape(-1)
        hidden = torch.bmm(self.up[flat], x.repeat_interleave(2, dim=0).unsqueeze(-1)).relu()
        out = torch.bmm(self.down[flat], hidden).squeeze(-1) * weights.reshape(-1, 1)
        return out.view(x.shape[0], 2, -1).sum(1)


def _spec_data(kind: str = "permutation", per_axis: int = 0) -> dict:
    up_role, down_role = ({"role": "out"}, {"role": "in"}) if kind == "scale" else ({}, {})
    return {
        "shapes": {"router.weight": [EXPERTS, WIDTH], "up": [EXPERTS, HIDDEN, WIDTH], "down": [EXPERTS, WIDTH, HIDDEN]},
        "groups": [
            {"name": "experts", "size": EXPERTS,
             "members": [{"param": "router.weight", "axis": 0}, {"param": "up", "axis": 0}, {"param": "down", "axis": 0}]},
            {"name": "experts.hidden", "size": HIDDEN, "per": "experts", "kind": kind,
             "members": [{"param": "up", "axis": 1, "per_axis": per_axis, **up_role},
                         {"param": "down", "axis": 2, "per_axis": 0, **down_role}]},
        ],
    }


def _model(seed: int) -> StackedExperts:
    torch.manual_seed(seed)
    return StackedExperts().double()


def _outputs(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("seed", range(3))
def test_each_expert_permuted_on_its_own_computes_the_same_function(seed: int) -> None:
    spec = PermutationSpec.from_dict(_spec_data())
    model = _model(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(9, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    reference = _outputs(model, state, x)
    perms = random_permutation(spec, seed=seed)
    assert perms["experts.hidden"].shape == (EXPERTS, HIDDEN)
    permuted = apply_permutation(spec, perms, state)
    torch.testing.assert_close(_outputs(model, permuted, x), reference, rtol=1e-12, atol=1e-12)
    # the rows belong to the experts after they moved: expert perms[experts][e] now sits at e
    source = perms["experts"][1]
    expected = state["up"][source][perms["experts.hidden"][1]]
    assert torch.equal(permuted["up"][1], expected)
    # one expert's hidden units moved without the others' (or without its down_proj) breaks the function
    broken = dict(state)
    broken["up"] = state["up"].clone()
    broken["up"][0] = state["up"][0].roll(1, dims=0)
    assert (_outputs(model, broken, x) - reference).abs().max() > 1e-6


def test_inverse_and_composition() -> None:
    spec = PermutationSpec.from_dict(_spec_data())
    state = _model(0).state_dict()
    first, second = random_permutation(spec, seed=1), random_permutation(spec, seed=2)
    permuted = apply_permutation(spec, first, state)
    back = apply_permutation(spec, invert_permutation(spec, first), permuted)
    for key in state:
        assert torch.equal(back[key], state[key]), key
    twice = apply_permutation(spec, second, permuted)
    composed = apply_permutation(spec, compose_permutations(spec, first, second), state)
    for key in state:
        assert torch.equal(twice[key], composed[key]), key
    identity = apply_permutation(spec, identity_permutation(spec), state)
    assert all(torch.equal(identity[k], state[k]) for k in state)


def test_permutations_through_apply_transform_equal_apply_permutation() -> None:
    spec = PermutationSpec.from_dict(_spec_data())
    state = _model(0).state_dict()
    perms = random_permutation(spec, seed=5)
    by_transform, by_permutation = apply_transform(spec, perms, state), apply_permutation(spec, perms, state)
    for key in state:
        assert torch.equal(by_transform[key], by_permutation[key]), key


@pytest.mark.parametrize("seed", range(3))
def test_per_expert_scales_compute_the_same_function(seed: int) -> None:
    spec = PermutationSpec.from_dict(_spec_data(kind="scale"))
    model = _model(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(9, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    reference = _outputs(model, state, x)
    transforms = {"experts.hidden": random_transform(spec, seed=seed)["experts.hidden"]}
    assert transforms["experts.hidden"].shape == (EXPERTS, HIDDEN) and transforms["experts.hidden"].is_floating_point()
    moved = apply_transform(spec, transforms, state)
    scale = transforms["experts.hidden"][2]
    torch.testing.assert_close(moved["up"][2], state["up"][2] * scale[:, None], rtol=1e-14, atol=0)  # experts stay put
    torch.testing.assert_close(_outputs(model, moved, x), reference, rtol=1e-12, atol=1e-12)
    both = apply_transform(spec, {**transforms, "experts": random_permutation(spec, seed=seed)["experts"]}, state)
    torch.testing.assert_close(_outputs(model, both, x), reference, rtol=1e-12, atol=1e-12)


def test_member_matrix_stacks_the_units_of_another_axis() -> None:
    spec = PermutationSpec.from_dict(_spec_data())
    down = torch.randn(EXPERTS, WIDTH, HIDDEN)
    member = spec["experts.hidden"].members[1]
    matrix = member_matrix(down, member, HIDDEN, fibred=True)
    assert matrix.shape == (EXPERTS, HIDDEN, WIDTH)
    assert torch.equal(matrix[3], down[3].T)


def test_yaml_round_trip_keeps_per_axis() -> None:
    spec = PermutationSpec.from_dict(_spec_data())
    text = spec.to_yaml()
    assert "per_axis: 0" in text
    assert PermutationSpec.from_yaml(text) == spec
    plain = PermutationSpec.from_dict({"groups": [{"name": "g", "size": 2, "members": [{"param": "w", "axis": 0}]}]})
    assert "per_axis" not in plain.to_yaml()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda data: data["groups"][1]["members"][0].update(per_axis=2), "has length 5"),
    (lambda data: data["groups"][1]["members"][0].update(per_axis=1), "is its own axis"),
    (lambda data: data["groups"][1]["members"][0].update(per_axis=3), "out of range"),
    (lambda data: data["groups"][1].pop("per"), "only members of a fibred group"),
    (lambda data: data["groups"][0]["members"][1].update(axis=1), "also moves axis 1"),
])
def test_a_wrong_per_axis_is_refused_naming_the_group(edit, message: str) -> None:
    data = _spec_data()
    edit(data)
    with pytest.raises(SpecError, match=message) as error:
        PermutationSpec.from_dict(data)
    assert "experts.hidden" in str(error.value)


def test_weight_matching_recovers_each_experts_own_permutation() -> None:
    spec = PermutationSpec.from_dict(_spec_data())
    state = _model(3).state_dict()
    planted = random_permutation(spec, seed=4)
    assert not torch.equal(planted["experts.hidden"][0], planted["experts.hidden"][1])
    permuted = apply_permutation(spec, planted, state)
    result = weight_matching(spec, state, permuted)
    aligned = apply_permutation(spec, result.perms, permuted)
    for key, tensor in state.items():
        assert torch.equal(aligned[key], tensor), key
