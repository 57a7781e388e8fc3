"""Transforms of every kind: the schema fields, apply_transform's conventions, random_transform's draws."""

from __future__ import annotations

import pytest
import torch

from autoperm import Member, PermutationGroup, PermutationSpec, SpecError, apply_permutation, apply_transform, random_transform
from autoperm.spec import random_permutation


def _spec(kind: str = "invertible", heads_kind: str = "invertible") -> PermutationSpec:
    """A linear -> linear pair (group ``hidden``, flattened by 2 into ``b``) and a fibred pair of groups."""
    roles = kind not in ("permutation", "orthogonal")
    head_roles = heads_kind not in ("permutation", "orthogonal")

    def member(param: str, axis: int, role: str, with_roles: bool, **layout) -> Member:
        return Member(param=param, axis=axis, role=role if with_roles else None, **layout)

    return PermutationSpec(
        groups=[
            PermutationGroup(name="hidden", size=4, kind=kind, members=[
                member("a.weight", 0, "out", roles), member("a.bias", 0, "out", roles),
                member("b.weight", 1, "in", roles, inner=2)]),
            PermutationGroup(name="heads", size=2, members=[Member(param="v.weight", axis=0, inner=3),
                                                            Member(param="o.weight", axis=1, inner=3)]),
            PermutationGroup(name="head_dims", size=3, per="heads", kind=heads_kind, members=[
                member("v.weight", 0, "out", head_roles, outer=((2, 3),)), member("o.weight", 1, "in", head_roles, outer=((2, 3),))]),
        ],
        shapes={"a.weight": (4, 5), "a.bias": (4,), "b.weight": (3, 8), "v.weight": (6, 5), "o.weight": (5, 6)},
    )


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in _spec().shapes.items()}


def _function(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``b(flatten(a(x) x 2 copies))`` and ``o(v(x))``: both linear in the groups' activations."""
    hidden = x @ sd["a.weight"].T + sd["a.bias"]
    first = hidden.repeat_interleave(2, dim=-1) @ sd["b.weight"].T
    return torch.cat([first, x @ sd["v.weight"].T @ sd["o.weight"].T], dim=-1)


def test_yaml_keeps_permutation_groups_unchanged_and_round_trips_kinds(tmp_path):
    plain = PermutationSpec(groups=[PermutationGroup(name="g", size=2, members=[Member(param="w", axis=0)])], shapes={"w": (2, 2)})
    assert "kind" not in plain.to_yaml() and "role" not in plain.to_yaml()
    spec = _spec()
    text = spec.to_yaml(tmp_path / "spec.yaml")
    assert "kind: invertible" in text and "role: in" in text
    assert PermutationSpec.from_yaml(tmp_path / "spec.yaml") == spec


def test_scale_and_invertible_groups_need_a_role_on_every_member():
    data = _spec().model_dump(mode="json")
    data["groups"][0]["members"][1].pop("role")
    with pytest.raises(SpecError, match=r"members\[1\] \('a.bias'\): a group of kind 'invertible' needs a role"):
        PermutationSpec.from_dict(data)
    data["groups"][0]["kind"] = "rotation"
    with pytest.raises(SpecError, match="kind"):
        PermutationSpec.from_dict(data)


@pytest.mark.parametrize("kind", ["permutation", "scale", "orthogonal", "invertible"])
def test_transforms_of_each_kind_keep_the_function_and_identity_is_identity(kind):
    spec, sd = _spec(kind, kind), _state()
    x = torch.randn(7, 5, dtype=torch.float64)
    transforms = random_transform(spec, seed=1)
    moved = apply_transform(spec, transforms, sd)
    assert torch.allclose(_function(moved, x), _function(sd, x), atol=1e-12)
    assert not torch.allclose(moved["a.weight"], sd["a.weight"])
    identity = {
        "hidden": {"permutation": torch.arange(4), "scale": torch.ones(4, dtype=torch.float64)}.get(kind, torch.eye(4, dtype=torch.float64)),
        "head_dims": {"permutation": torch.arange(3).expand(2, 3), "scale": torch.ones(2, 3, dtype=torch.float64)}.get(
            kind, torch.eye(3, dtype=torch.float64).expand(2, 3, 3)),
    }
    unchanged = apply_transform(spec, identity, sd)
    assert all(torch.allclose(unchanged[name], sd[name], atol=1e-15) for name in sd)


def test_permutations_apply_as_apply_permutation_does():
    spec, sd = _spec(), _state()
    perms = random_permutation(spec, seed=3)
    expected = apply_permutation(spec, perms, sd)
    got = apply_transform(spec, perms, sd)
    assert all(torch.equal(got[name], expected[name]) for name in sd)


def test_roles_out_move_by_t_and_in_by_t_inverse_transposed():
    spec, sd = _spec(), _state()
    t = torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    moved = apply_transform(spec, {"hidden": t}, sd)
    assert torch.allclose(moved["a.weight"], t @ sd["a.weight"])
    assert torch.allclose(moved["a.bias"], t @ sd["a.bias"])
    reader = sd["b.weight"].view(3, 4, 2)  # column 2i + s reads unit i
    assert torch.allclose(moved["b.weight"].view(3, 4, 2), torch.einsum("ojs,ji->ois", reader, torch.linalg.inv(t)))
    back = apply_transform(spec, {"hidden": torch.linalg.inv(t)}, moved)
    assert all(torch.allclose(back[name], sd[name], atol=1e-12) for name in sd)


def test_fibred_transforms_follow_the_heads_permutation():
    spec, sd = _spec(), _state()
    x = torch.randn(4, 5, dtype=torch.float64)
    transforms = {"heads": torch.tensor([1, 0]), **{k: v for k, v in random_transform(spec, seed=2).items() if k == "head_dims"}}
    moved = apply_transform(spec, transforms, sd)
    assert torch.allclose(_function(moved, x), _function(sd, x), atol=1e-12)
    head = transforms["head_dims"][0]  # head slot 0 of the permuted model holds old head 1
    assert torch.allclose(moved["v.weight"][:3], head @ sd["v.weight"][3:])


@pytest.mark.parametrize("group_kind, transform, message", [
    ("permutation", torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0], "'hidden' is of kind 'permutation'"),
    ("orthogonal", torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64), "does not admit invertible transforms"),
    ("orthogonal", torch.full((4,), 2.0, dtype=torch.float64), "does not admit scale transforms"),
    ("scale", -torch.ones(4, dtype=torch.float64), "scales must be positive"),
    ("invertible", torch.zeros(4, 4, dtype=torch.float64), "'hidden' is singular"),
    ("invertible", torch.ones(3, dtype=torch.float64), "has shape \\[3\\]"),
])
def test_refuses_a_transform_the_group_does_not_admit(group_kind, transform, message):
    spec = _spec(group_kind)
    with pytest.raises(SpecError, match=message):
        apply_transform(spec, {"hidden": transform}, _state())


def test_random_transform_draws_each_kind():
    spec = _spec("invertible", "orthogonal")
    drawn = random_transform(spec, seed=0)
    assert drawn["heads"].dtype == torch.long
    q = drawn["head_dims"]
    assert q.shape == (2, 3, 3) and torch.allclose(q @ q.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    assert torch.linalg.cond(drawn["hidden"]).item() < torch.e
    assert not torch.allclose(drawn["hidden"] @ drawn["hidden"].T, torch.eye(4, dtype=torch.float64))
    scales = random_transform(_spec("scale"), seed=0)["hidden"]
    assert scales.shape == (4,) and bool((scales > 0).all()) and bool((scales.log().abs() <= 1).all())
    only = random_transform(spec, seed=0, kinds=["permutation"])
    assert all(t.dtype == torch.long for t in only.values())
    capped = random_transform(spec, seed=0, kinds=["orthogonal"])["hidden"]
    assert torch.allclose(capped @ capped.T, torch.eye(4, dtype=torch.float64))
    assert torch.equal(random_transform(spec, seed=5)["hidden"], random_transform(spec, seed=5)["hidden"])
    with pytest.raises(SpecError, match="unknown kinds"):
        random_transform(spec, kinds=["rotation"])


@pytest.mark.parametrize("kind", ["orthogonal", "invertible"])
def test_ones_fixing_groups_draw_and_check(kind):
    """``fixes_ones`` groups draw maps with ``T 1 = 1`` (per head when fibred); other matrices are refused, naming the group."""
    roles = kind == "invertible"
    spec = PermutationSpec(
        groups=[
            PermutationGroup(name="stream", size=5, kind=kind, fixes_ones=True, members=[
                Member(param="w", axis=0, role="out" if roles else None), Member(param="r", axis=1, role="in" if roles else None)]),
            PermutationGroup(name="heads", size=2, members=[Member(param="v", axis=0, inner=3)]),
            PermutationGroup(name="dims", size=3, per="heads", kind=kind, fixes_ones=True,
                             members=[Member(param="v", axis=0, outer=((2, 3),), role="out" if roles else None)]),
        ],
        shapes={"w": (5, 4), "r": (2, 5), "v": (6, 4)},
    )
    for seed in range(3):
        drawn = random_transform(spec, seed=seed)
        for name, size in (("stream", 5), ("dims", 3)):
            matrix = drawn[name]
            assert torch.allclose(matrix @ torch.ones(size, dtype=torch.float64), torch.ones(matrix.shape[:-1], dtype=torch.float64))
            if kind == "orthogonal":
                assert torch.allclose(matrix @ matrix.transpose(-1, -2), torch.eye(size, dtype=torch.float64).expand_as(matrix))
        apply_transform(spec, drawn, {name: torch.randn(shape, dtype=torch.float64) for name, shape in spec.shapes.items()})
    reflection = torch.eye(5, dtype=torch.float64)
    reflection[0, 0] = -1
    with pytest.raises(SpecError, match="'stream'.*all-ones"):
        apply_transform(spec, {"stream": reflection}, {})
    assert set(random_transform(spec, seed=0, kinds=["permutation"])) == {"stream", "heads", "dims"}
