"""Symmetry kinds: inference against hand derivations, soundness of each kind, and verify on unsound claims.

Hand derivations (Theus et al., arXiv 2506.22712): between two linear layers any invertible map
fits (W2 T^-1, T W1, T b1); ReLU keeps positive scales, GELU only permutations; a residual
stream read by RMSNorm without a gain keeps orthogonal maps, one read by LayerNorm or by a norm
with a gain only permutations; per head the query-key dims keep invertible maps, M on q and M^-T
on k (the keys sit on the dual side of the contraction), the value-output dims invertible ones;
heads permute as units. A contraction of one activation against itself (a Gram matrix) keeps only
orthogonal maps.
"""

from __future__ import annotations

import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from autoperm import PermutationSpec, infer_spec, verify_spec
from autoperm.cli import cli
from tests.conftest import perturb_

NORMS = {
    "rms": lambda d: nn.RMSNorm(d, elementwise_affine=False),
    "rms_gain": lambda d: nn.RMSNorm(d),
    "layer": lambda d: nn.LayerNorm(d),
}
STREAM_KIND = {"rms": "orthogonal", "rms_gain": "permutation", "layer": "permutation"}
HIDDEN_KIND = {"relu": "scale", "gelu": "permutation"}


def _rotate(x: torch.Tensor, positions: int) -> torch.Tensor:
    """Rotary embedding of the last dim (pairs of halves), as LLaMA applies it."""
    half = x.shape[-1] // 2
    angles = torch.arange(positions)[:, None] * (10000.0 ** (-torch.arange(half) / half))[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    """Pre-norm transformer block: fused qkv, scaled dot-product attention, an MLP."""

    def __init__(self, width: int, heads: int, norm: str, act: str, rope: bool):
        super().__init__()
        self.norm1, self.norm2 = NORMS[norm](width), NORMS[norm](width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.heads, self.act, self.rope = heads, act, rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            q, k = _rotate(q, tokens), _rotate(k, tokens)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.proj(attended)
        hidden = self.up(self.norm2(x))
        return x + self.down(F.relu(hidden) if self.act == "relu" else F.gelu(hidden))


class Transformer(nn.Module):
    def __init__(self, width: int = 8, heads: int = 2, depth: int = 2, norm: str = "rms", act: str = "relu", rope: bool = False,
                 tied: bool = False, vocab: int = 11):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width, heads, norm, act, rope) for _ in range(depth)])
        self.norm = NORMS[norm](width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _kinds(spec: PermutationSpec) -> dict[str, str]:
    return {group.name: group.kind for group in spec.active_groups}


def _mlp(act: nn.Module, norm: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 6), *([norm] if norm is not None else []), act, nn.Linear(6, 3))


def test_mlp_kinds_follow_the_activation():
    x = torch.randn(2, 5)
    relu = infer_spec(_mlp(nn.ReLU()), x).groups[0]
    assert relu.kind == "scale" and "ReLU" in relu.kind_limited_by
    assert [m.role for m in relu.members] == ["out", "out", "in"]
    assert infer_spec(_mlp(nn.LeakyReLU()), x).groups[0].kind == "scale"
    gelu = infer_spec(_mlp(nn.GELU()), x).groups[0]
    assert gelu.kind == "permutation" and gelu.kind_limited_by is None and all(m.role is None for m in gelu.members)
    assert infer_spec(_mlp(nn.Dropout(0.1)), x).groups[0].kind == "invertible"  # dropout is the identity in eval mode
    assert infer_spec(_mlp(nn.ReLU(), nn.BatchNorm1d(6)), x).groups[0].kind == "permutation"
    assert infer_spec(_mlp(nn.ReLU6()), x).groups[0].kind == "permutation"  # relu6 caps at 6: not homogeneous


class _Affine(nn.Module):
    def __init__(self, shift: float | None):
        super().__init__()
        self.a, self.b, self.shift = nn.Linear(4, 4), nn.Linear(4, 2), shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h + self.shift if self.shift is not None else h * 2.0 + h)


def test_numbers_scale_linearly_but_shift_affinely():
    x = torch.randn(3, 4)
    assert infer_spec(_Affine(None), x).groups[0].kind == "invertible"
    assert infer_spec(_Affine(1.0), x).groups[0].kind == "permutation"


def test_transformer_kinds_match_the_derivation():
    ids = torch.randint(0, 11, (2, 5))
    for norm, act in [("rms", "relu"), ("rms_gain", "gelu"), ("layer", "relu")]:
        spec = infer_spec(Transformer(norm=norm, act=act), ids)
        kinds = _kinds(spec)
        assert kinds["embed"] == STREAM_KIND[norm], (norm, kinds)
        for index in range(2):
            assert kinds[f"blocks.{index}.qkv.heads"] == "permutation"
            assert kinds[f"blocks.{index}.qkv.head_dims.0"] == "invertible"  # query-key: M on q, M^-T on k
            query_key = spec.group_by_name[f"blocks.{index}.qkv.head_dims.0"]
            roles = {(m.param, m.offset): m.role for m in query_key.members}
            assert roles[(f"blocks.{index}.qkv.weight", 0)] != roles[(f"blocks.{index}.qkv.weight", 8)]  # q rows, k rows
            assert kinds[f"blocks.{index}.qkv.head_dims.1"] == "invertible"  # value-output
            assert kinds[f"blocks.{index}.up"] == HIDDEN_KIND[act]
    stream = infer_spec(Transformer(norm="rms"), ids).group_by_name["embed"]
    assert "RMSNorm" in stream.kind_limited_by


def test_rope_keeps_the_value_output_maps_and_fixes_the_query_key_dims():
    spec = infer_spec(Transformer(rope=True), torch.randint(0, 11, (2, 5)))
    kinds = _kinds(spec)
    assert kinds["blocks.0.qkv.head_dims"] == "invertible"
    assert not any(name.endswith("head_dims.0") or name.endswith("head_dims.1") for name in kinds)


class _Linear(nn.Module):
    """Embedding -> linear layers -> head, with no norm: the stream admits any invertible map unless tied."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x + self.mix(x))


def test_a_tied_table_that_writes_and_reads_the_stream_limits_it_to_orthogonal_maps():
    ids = torch.randint(0, 7, (2, 3))
    assert infer_spec(_Linear(tied=False), ids).groups[0].kind == "invertible"
    tied = infer_spec(_Linear(tied=True), ids).groups[0]
    assert tied.kind == "orthogonal" and "both roles" in tied.kind_limited_by


def test_multihead_attention_module_kinds():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attention, self.out = nn.Linear(3, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attention(h, h, h, need_weights=False)[0])

    model = perturb_(Attention().eval())
    x = torch.randn(2, 4, 3)
    kinds = sorted(_kinds(infer_spec(model, x)).values())
    assert kinds == ["invertible"] * 3 + ["orthogonal", "permutation"]  # input, value-output, output; query-key; heads
    assert verify_spec(model, infer_spec(model, x), x).passed


@given(norm=st.sampled_from(sorted(NORMS)), act=st.sampled_from(["relu", "gelu"]), rope=st.booleans(), heads=st.sampled_from([1, 2, 4]),
       tied=st.booleans(), seed=st.integers(0, 1000))
def test_random_transformers_have_the_derived_kinds_and_are_sound(norm, act, rope, heads, tied, seed):
    torch.manual_seed(seed)
    model = perturb_(Transformer(heads=heads, norm=norm, act=act, rope=rope, tied=tied).eval(), seed=seed)
    ids = torch.randint(0, 11, (2, 5))
    spec = infer_spec(model, ids)
    kinds = _kinds(spec)
    assert kinds["embed"] == STREAM_KIND[norm]
    assert all(kinds[f"blocks.{i}.up"] == HIDDEN_KIND[act] for i in range(2))
    for name, kind in kinds.items():
        if name.endswith(".heads"):
            assert kind == "permutation"
    for seed_offset in range(3):
        report = verify_spec(model, spec, ids, seed=seed + seed_offset)
        assert report.passed, (report, kinds)


class GramAttention(nn.Module):
    """Scores of the projected tokens against themselves, ``q q^T``: only orthogonal maps keep them."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.q, self.v, self.out = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        scores = torch.softmax(q @ q.transpose(-1, -2), dim=-1)
        return self.out(scores @ self.v(x))


class CrossScores(nn.Module):
    """``q k^T`` written as a matmul (eager attention), with a bias on each side."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
        return self.out(scores @ self.v(x))


def test_a_contraction_against_itself_keeps_orthogonal_maps_and_one_against_another_invertible():
    x = torch.randn(2, 4, 6)
    gram = infer_spec(perturb_(GramAttention().eval()), x)
    assert gram.group_by_name["q"].kind == "orthogonal"
    assert verify_spec(perturb_(GramAttention().eval()), gram, x).passed
    model = perturb_(CrossScores().eval())
    cross = infer_spec(model, x)
    query_key = cross.group_by_name["q"]
    assert query_key.kind == "invertible"
    assert {(m.param, m.role) for m in query_key.members} == {
        ("q.weight", "out"), ("q.bias", "out"), ("k.weight", "in"), ("k.bias", "in")} or {
        ("q.weight", "in"), ("q.bias", "in"), ("k.weight", "out"), ("k.bias", "out")} == {(m.param, m.role) for m in query_key.members}
    for seed in range(3):
        assert verify_spec(model, cross, x, seed=seed).passed


def _claim(spec: PermutationSpec, name: str, kind: str) -> PermutationSpec:
    """``spec`` with group ``name`` declared of ``kind`` (a hand edit of the YAML), roles as inference would give."""
    data = spec.model_dump(mode="json")
    for group in data["groups"]:
        if group["name"] == name:
            group["kind"] = kind
            for member in group["members"]:
                member["role"] = "in" if member["param"].endswith("2.weight") else "out"
    return PermutationSpec.from_dict(data)


def test_a_kind_the_model_does_not_admit_fails_verify_with_the_group_named(tmp_path):
    model = perturb_(_mlp(nn.GELU()).eval())
    x = torch.randn(4, 5)
    spec = infer_spec(model, x)
    assert verify_spec(model, spec, x).passed
    for kind in ("orthogonal", "scale", "invertible"):
        report = verify_spec(model, _claim(spec, "0", kind), x)
        assert not report.passed and report.failed_groups == ("0",), (kind, report)
        assert verify_spec(model, _claim(spec, "0", kind), x, kinds=["permutation"]).passed
    path = tmp_path / "edited.yaml"
    _claim(infer_spec(nn.Sequential(nn.Linear(784, 6), nn.GELU(), nn.Linear(6, 3)), torch.randn(1, 784)), "0", "orthogonal").to_yaml(path)
    result = CliRunner().invoke(cli, ["verify", "tests.infer.test_kinds:gelu_mlp", "--input-shape", "1,784", "--spec", str(path)])
    assert result.exit_code != 0 and "group(s) '0' do not admit their declared kind" in str(result.exception), result.output


def gelu_mlp() -> nn.Module:
    """A model for the CLI test (built by ``autoperm verify`` from its import path)."""
    return perturb_(nn.Sequential(nn.Linear(784, 6), nn.GELU(), nn.Linear(6, 3)).eval())
