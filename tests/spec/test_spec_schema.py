"""The spec data model: YAML round trip, validation messages, apply conventions."""

from __future__ import annotations

import pytest
import torch

from autoperm import Member, PermutationGroup, PermutationSpec, SpecError, apply_permutation, random_permutation
from autoperm.spec import compose_permutations, identity_permutation, invert_permutation, member_matrix, permute_tensor


def _spec() -> PermutationSpec:
    return PermutationSpec(
        groups=[
            PermutationGroup(name="hidden", size=4, members=[Member(param="a.weight", axis=0), Member(param="a.bias", axis=0),
                                                             Member(param="b.weight", axis=1, inner=2)]),
            PermutationGroup(name="out", size=3, members=[Member(param="b.weight", axis=0)], fixed=True),
        ],
        shapes={"a.weight": (4, 5), "a.bias": (4,), "b.weight": (3, 8)},
    )


def test_yaml_round_trip(tmp_path):
    spec = _spec()
    path = tmp_path / "spec.yaml"
    text = spec.to_yaml(path)
    assert PermutationSpec.from_yaml(path) == spec
    assert "inner: 2" in text and "fixed: true" in text
    assert "b.weight: [3, 8]" in text  # number lists stay on one line


def test_convention_new_equals_old_at_p():
    spec = _spec()
    sd = {"a.weight": torch.randn(4, 5), "a.bias": torch.randn(4), "b.weight": torch.randn(3, 8)}
    p = torch.tensor([2, 0, 3, 1])
    out = apply_permutation(spec, {"hidden": p}, sd)
    assert torch.equal(out["a.weight"], sd["a.weight"][p])
    assert torch.equal(out["a.bias"], sd["a.bias"][p])
    # a flattened axis: index i covers positions 2i, 2i+1
    expanded = torch.stack([2 * p, 2 * p + 1], dim=1).flatten()
    assert torch.equal(out["b.weight"], sd["b.weight"][:, expanded])
    assert torch.equal(sd["a.weight"], sd["a.weight"])  # inputs untouched (same objects, no in-place)


def test_apply_does_not_modify_input():
    spec = _spec()
    sd = {"a.weight": torch.randn(4, 5), "a.bias": torch.randn(4), "b.weight": torch.randn(3, 8)}
    copy = {k: v.clone() for k, v in sd.items()}
    apply_permutation(spec, random_permutation(spec, seed=1), sd)
    assert all(torch.equal(sd[k], copy[k]) for k in sd)


def test_fixed_group_is_not_permuted():
    spec = _spec()
    assert [g.name for g in spec.active_groups] == ["hidden"]
    assert set(random_permutation(spec, seed=0)) == {"hidden"}
    with pytest.raises(SpecError, match="unknown group"):
        apply_permutation(spec, {"nope": torch.arange(3)}, {})


def test_invert_and_compose():
    spec = _spec()
    sd = {"a.weight": torch.randn(4, 5), "a.bias": torch.randn(4), "b.weight": torch.randn(3, 8)}
    p = random_permutation(spec, seed=3)
    q = random_permutation(spec, seed=4)
    back = apply_permutation(spec, invert_permutation(spec, p), apply_permutation(spec, p, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    both = apply_permutation(spec, compose_permutations(spec, p, q), sd)
    step = apply_permutation(spec, q, apply_permutation(spec, p, sd))
    assert all(torch.equal(both[k], step[k]) for k in sd)
    ident = apply_permutation(spec, identity_permutation(spec), sd)
    assert all(torch.equal(ident[k], sd[k]) for k in sd)


def test_not_a_permutation_is_rejected():
    spec = _spec()
    with pytest.raises(SpecError, match="not a permutation"):
        apply_permutation(spec, {"hidden": torch.tensor([0, 0, 1, 2])}, {})


def test_member_matrix_puts_group_index_first():
    layout = Member(param="w", axis=1, inner=2, outer=((2, 8),))
    tensor = torch.arange(3 * 16).reshape(3, 16)
    matrix = member_matrix(tensor, layout, 4)
    assert matrix.shape == (4, 3 * 2 * 2)
    # group index 1 covers positions {2,3} and {10,11}
    assert set(matrix[1].tolist()) == {r * 16 + c for r in range(3) for c in (2, 3, 10, 11)}


def test_permute_tensor_skip():
    spec = _spec()
    w = torch.randn(4, 5)
    assert permute_tensor(spec, {"hidden": torch.tensor([1, 0, 2, 3])}, "a.weight", w, skip={"hidden"}) is w


@pytest.mark.parametrize(
    "text, field",
    [
        ("groups:\n- name: g\n  size: 0\n  members: []\n", "groups[0](g).size"),
        ("groups:\n- name: g\n  size: 2\n  members:\n  - {param: w, axis: x}\n", "groups[0](g).members[0](w).axis"),
        ("groups:\n- name: g\n  size: 2\n  members: []\n  colour: red\n", "groups[0](g).colour"),
        ("groups: [\n", "not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
    ],
)
def test_invalid_yaml_names_the_field(text, field):
    with pytest.raises(SpecError) as error:
        PermutationSpec.from_yaml(text)
    assert field in str(error.value)


def test_layout_out_of_range_is_reported():
    with pytest.raises(SpecError, match="reaches position"):
        PermutationSpec.from_dict({"groups": [{"name": "g", "size": 4, "members": [{"param": "w", "axis": 0, "inner": 2}]}],
                                   "shapes": {"w": [4, 3]}})


def test_state_dict_mismatch_names_keys():
    spec = _spec()
    with pytest.raises(SpecError, match=r"missing 'a.bias'.*'b.weight' has shape \[3, 9\]"):
        spec.check_state_dict({"a.weight": torch.zeros(4, 5), "b.weight": torch.zeros(3, 9)})


def test_missing_file_message(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        PermutationSpec.from_yaml(tmp_path / "absent.yaml")


def test_edited_yaml_is_used(tmp_path):
    spec = _spec()
    text = spec.to_yaml().replace("name: hidden\n  size: 4\n", "name: hidden\n  size: 4\n  fixed: true\n")
    edited = PermutationSpec.from_yaml(text)
    assert edited.active_groups == ()
