"""Attention heads: fibred within-head groups are sound and weight matching recovers them exactly."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import autoperm
from autoperm.verify import verify_spec
from tests.conftest import perturb_
from tests._specs import record_lap_methods


class Block(nn.Module):
    """A pre-norm transformer block written with plain matmuls and softmax (no attention module)."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 4, hidden: int = 24, classes: int = 3):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Linear(5, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        x = self.embed(x)
        h = self.norm1(x)
        q = self.q(h).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k = k[:, :, None].expand(batch, self.kv_heads, repeat, tokens, self.head_dim).reshape(batch, self.heads, tokens, self.head_dim)
        v = v[:, :, None].expand(batch, self.kv_heads, repeat, tokens, self.head_dim).reshape(batch, self.heads, tokens, self.head_dim)
        scores = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, dim=-1)
        attended = (scores @ v).transpose(1, 2).reshape(batch, tokens, -1)
        x = x + self.o(attended)
        x = x + self.down(F.silu(self.gate(self.norm2(x))) * self.up(self.norm2(x)))
        return self.head(x.mean(1))


def _planted_recovery(model: nn.Module, inputs, seed: int = 0) -> autoperm.PermutationSpec:
    model = perturb_(model.eval(), seed=seed)
    spec = autoperm.infer_spec(model, inputs)
    assert verify_spec(model, spec, inputs, seed=seed).passed
    state = model.state_dict()
    planted = autoperm.random_permutation(spec, seed=seed + 1)
    permuted = autoperm.apply_permutation(spec, planted, state)
    result = autoperm.weight_matching(spec, state, permuted, seed=seed)
    recovered = autoperm.apply_permutation(spec, result.perms, permuted)
    assert all(torch.equal(recovered[name], state[name]) for name in state)
    return spec


def test_matmul_attention_heads_and_within_head_dims():
    spec = _planted_recovery(Block(), torch.randn(2, 6, 5))
    groups = {g.name: g for g in spec.active_groups}
    assert groups["q.heads"].size == 4
    fibred = sorted((g.size, g.per) for g in spec.active_groups if g.per)
    assert fibred == [(4, "q.heads"), (4, "q.heads")]  # query/key dims and value/output dims, per head
    assert sum(1 for g in spec.active_groups if g.per is None) == 3  # stream, heads, gated MLP hidden


def test_grouped_query_attention():
    spec = _planted_recovery(Block(dim=16, heads=4, kv_heads=2), torch.randn(2, 6, 5), seed=3)
    sizes = sorted((g.size, g.per is not None) for g in spec.active_groups)
    # stream 16, MLP 24, kv heads 2, query heads per kv head 2 (fibred), qk dims 4, v dims 4 (fibred)
    assert sizes == [(2, False), (2, True), (4, True), (4, True), (16, False), (24, False)]


def test_multihead_attention_module():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            x = self.inp(x)
            return self.out(x + self.attn(x, x, x, need_weights=False)[0])

    spec = _planted_recovery(Encoder(), torch.randn(2, 5, 3), seed=5)
    assert sorted((g.size, g.per is not None) for g in spec.active_groups) == [(2, False), (4, True), (4, True), (8, False)]


class GroupedConvStream(nn.Module):
    """A residual stream read by a grouped conv: its channels are heads x one shared within-head
    permutation (the grouped conv's input side cannot tell its groups apart)."""

    def __init__(self, groups: int = 2, width: int = 3):
        super().__init__()
        self.embed = nn.Conv2d(2, groups * width, 1)
        self.grouped = nn.Conv2d(groups * width, groups * width, 3, padding=1, groups=groups)
        self.projection = nn.Conv2d(groups * width, groups * width, 1)
        self.head = nn.Linear(groups * width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.projection(torch.relu(self.grouped(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("model", ["block", "grouped_conv"])
def test_lap_backend_reaches_the_head_solver(monkeypatch, model: str):
    from autoperm.solvers import heads

    if model == "block":
        module, inputs = perturb_(Block().eval(), seed=2), torch.randn(2, 6, 5)
    else:
        module, inputs = perturb_(GroupedConvStream().eval()), torch.randn(1, 2, 5, 5)
    spec = autoperm.infer_spec(module, inputs)
    if model == "grouped_conv":  # heads and a within-head group every head shares (solve_shared)
        assert any(heads.shared_within(spec, g) for g in spec.active_groups)
    state = module.state_dict()
    permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=4), state)
    methods = record_lap_methods(monkeypatch, heads)
    result = autoperm.weight_matching(spec, state, permuted, lap="scipy")
    assert methods and set(methods) == {"scipy"}
    recovered = autoperm.apply_permutation(spec, result.perms, permuted)
    assert all(torch.allclose(recovered[name], state[name]) for name in state)


def test_random_permutation_of_fibred_group_has_one_row_per_head():
    spec = autoperm.infer_spec(Block(), torch.randn(1, 3, 5))
    perms = autoperm.random_permutation(spec, seed=0)
    for group in spec.active_groups:
        if group.per:
            assert perms[group.name].shape == (spec[group.per].size, group.size)
    yaml_text = spec.to_yaml()
    assert "per: q.heads" in yaml_text
    assert autoperm.PermutationSpec.from_yaml(yaml_text) == spec


def test_merge_many_and_ste_on_heads():
    model = perturb_(Block().eval(), seed=7)
    inputs = torch.randn(2, 6, 5)
    spec = autoperm.infer_spec(model, inputs)
    state = model.state_dict()
    copies = [autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=s), state) for s in (11, 12)]
    merged = autoperm.merge_many(spec, [state, *copies], method="wm")
    assert all(torch.allclose(merged.state_dict[k], state[k], atol=1e-6) for k in state)

    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 6, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(2)]
    other = perturb_(Block().eval(), seed=8).state_dict()
    result = autoperm.ste_matching(spec, model, state, other, data, epochs=1, lr=1e-2)
    for group in spec.active_groups:
        expected = (spec[group.per].size, group.size) if group.per else (group.size,)
        assert tuple(result.perms[group.name].shape) == expected


def _hf_planted(cls, config, inputs):
    model = perturb_(cls(config).eval(), scale=0.02)
    spec = autoperm.infer_spec(model, inputs)
    assert verify_spec(model, spec, inputs).passed
    state = model.state_dict()
    permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=2), state)
    result = autoperm.weight_matching(spec, state, permuted)
    recovered = autoperm.apply_permutation(spec, result.perms, permuted)
    assert all(torch.equal(recovered[k], state[k]) for k in state)
    return spec


def test_planted_recovery_gpt2_with_tied_embeddings():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16, use_cache=False)
    spec = _hf_planted(transformers.GPT2LMHeadModel, config, torch.randint(0, 50, (1, 8)))
    assert sum(1 for g in spec.active_groups if g.per) == 2


def test_planted_recovery_llama_gqa_rope():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=48, vocab_size=50, max_position_embeddings=16,
                                      tie_word_embeddings=False, use_cache=False)
    spec = _hf_planted(transformers.LlamaForCausalLM, config, torch.randint(0, 50, (1, 8)))
    heads = [g for g in spec.active_groups if any(f.per == g.name for f in spec.active_groups)]
    assert [g.size for g in heads] == [2]  # key/value heads; query heads within each are fibred


class MaskedEncoder(nn.Module):
    """nn.MultiheadAttention with a causal mask, and a head split written as (N, H*d) -> (N*H, d)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)
        self.register_buffer("causal", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), persistent=False)

    def forward(self, x):
        x = self.inp(x)
        return self.out(x + self.attn(x, x, x, need_weights=False, attn_mask=self.causal)[0])


def test_masked_attention_module_under_both_front_ends():
    model = perturb_(MaskedEncoder().eval(), seed=4)
    x = torch.randn(2, 5, 3)
    fx_spec = autoperm.infer_spec(model, x, tracer="fx")
    assert sorted((g.size, g.per is not None) for g in fx_spec.active_groups) == [(2, False), (4, True), (4, True), (8, False)]
    # torch.export decomposes the module: (L, N, E) -> (L, N*H, d) views are refined into N, H, d,
    # and the stacked q/k/v projection keeps one within-head permutation shared by q, k and v.
    export_spec = autoperm.infer_spec(model, x, tracer="export")
    assert sorted(g.size for g in export_spec.active_groups) == [2, 4, 8]
    for spec in (fx_spec, export_spec):
        assert verify_spec(model, spec, x).passed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_within_head_pair_costs_equal_the_float64_reference(dtype: torch.dtype, monkeypatch) -> None:
    """All head pairs' within-head costs from one sliced product: float32 for half precision (exact
    products, rounded sums), float64 otherwise; equal to the float64 einsum over every pair."""
    from autoperm.solvers import heads as heads_module
    from autoperm.spec import member_matrix, permute_tensor

    monkeypatch.setattr(importlib.import_module("autoperm.solvers.costs"), "_CHUNK_ELEMENTS", 64)
    model = perturb_(Block(dim=32, heads=4, kv_heads=2, hidden=24).eval(), seed=0)
    spec = autoperm.infer_spec(model, torch.randn(2, 6, 5))
    sd_a = {k: v.to(dtype) for k, v in model.state_dict().items()}
    sd_b = {k: v.to(dtype) for k, v in perturb_(Block(dim=32, heads=4, kv_heads=2, hidden=24), seed=1).state_dict().items()}
    perms = autoperm.random_permutation(spec, seed=2)
    checked = 0
    for fibre in (g for g in spec.active_groups if g.per is not None):
        skip = {fibre.per, fibre.name}
        for member in fibre.members:
            cost = heads_module._pair_costs(spec, perms, member, fibre.size, sd_a[member.param], sd_b[member.param], skip)
            b_other = permute_tensor(spec, perms, member.param, sd_b[member.param].double(), skip=skip)
            a_matrix = member_matrix(sd_a[member.param].double(), member, fibre.size, fibred=True)
            b_matrix = member_matrix(b_other, member, fibre.size, fibred=True)
            expected = torch.einsum("aik,bjk->abij", a_matrix, b_matrix)
            tolerance = 1e-12 if dtype in (torch.float32, torch.float64) else 1e-6
            assert cost.dtype == torch.float64 and cost.shape == expected.shape
            assert float((cost - expected).abs().max()) <= tolerance * float(expected.abs().max()), member.param
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_heads_planted_permutation_recovered(dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(importlib.import_module("autoperm.solvers.costs"), "_CHUNK_ELEMENTS", 64)
    model = perturb_(Block(dim=32, heads=4, kv_heads=2, hidden=24).eval(), seed=4)
    spec = autoperm.infer_spec(model, torch.randn(2, 6, 5))
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=5), state)
    result = autoperm.weight_matching(spec, state, permuted)
    recovered = autoperm.apply_permutation(spec, result.perms, permuted)
    assert all(torch.equal(recovered[name], state[name]) for name in state)
