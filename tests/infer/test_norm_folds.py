"""Which norm gains inference records as foldable, and the readers it finds.

A gain folds only when linear layers alone read the norm's output (through reshapes, casts,
token selection and means over tokens); any other reader, a gain or reader weight used twice
(a tied head), or a norm that is a model output keeps it unfolded. Each recognised structure is
also checked end to end: its canonical form computes the same function in float64.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autoperm import PermutationSpec, apply_transform, canonicalize, infer_spec, random_transform, to_gauge


def _same_function(model: nn.Module, inputs: tuple, seed: int = 0) -> None:
    """Canonical form and a random transform of it compute what ``model`` computes (float64)."""
    model = model.double().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    spec = infer_spec(model, inputs)
    canonical, state = canonicalize(spec, model.state_dict())
    transformed = apply_transform(canonical, random_transform(canonical, seed=seed), state)
    with torch.no_grad():
        expected = model(*inputs)
        for candidate in (state, transformed):
            clone = copy.deepcopy(model)
            clone.load_state_dict(candidate)
            assert (clone(*inputs) - expected).abs().max().item() <= 1e-9 * max(1.0, expected.abs().max().item())


class AttentionBlock(nn.Module):
    """Pre-LayerNorm block with ``nn.MultiheadAttention``, classifying the first token (as torchvision's ViT)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.final = nn.LayerNorm(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        h = self.norm(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return self.head(self.final(x)[:, 0])


def test_multihead_attention_and_token_selection_are_readers():
    model = AttentionBlock()
    spec = infer_spec(model, torch.randn(2, 5, 3))
    readers = {fold.gain: [(r.weight, r.axis, r.bias) for r in fold.readers] for fold in spec.norm_folds}
    assert readers == {"norm.weight": [("attention.in_proj_weight", 1, "attention.in_proj_bias")],
                       "final.weight": [("head.weight", 1, "head.bias")]}
    stream = spec["inp"]
    assert stream.kind == "permutation" and (stream.folded.kind, stream.folded.fixes_ones) == ("orthogonal", True)
    _same_function(AttentionBlock(), (torch.randn(2, 5, 3, dtype=torch.float64),))


class IdentityBeforeHead(AttentionBlock):
    """timm's ViT head: the first token, then ``fc_norm = Identity()`` and ``head_drop = Dropout()``."""

    def __init__(self, width: int = 8):
        super().__init__(width)
        self.fc_norm, self.head_drop = nn.Identity(), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        h = self.norm(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return self.head(self.head_drop(self.fc_norm(self.final(x)[:, 0])))


def test_identity_and_dropout_modules_pass_the_gain_on():
    spec = infer_spec(IdentityBeforeHead().eval(), torch.randn(2, 5, 3))
    assert {fold.gain: [r.weight for r in fold.readers] for fold in spec.norm_folds}["final.weight"] == ["head.weight"]
    assert spec["inp"].folded.kind == "orthogonal"
    _same_function(IdentityBeforeHead(), (torch.randn(2, 5, 3, dtype=torch.float64),))


class LayerScaled(nn.Module):
    """Pre-LayerNorm residual blocks whose outputs are scaled per channel before the add (LayerScale,
    as timm's ``x + drop_path(ls(proj_drop(proj(...))))``); ``share`` reads the MLP output twice."""

    def __init__(self, width: int = 8, share: bool = False):
        super().__init__()
        self.inp, self.share = nn.Linear(3, width), share
        self.norm1, self.norm2, self.final = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.up, self.down, self.drop = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Dropout(0.1)
        self.gamma1, self.gamma2 = nn.Parameter(torch.ones(width)), nn.Parameter(torch.ones(width))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        h = self.norm1(x)
        x = x + self.gamma1 * self.attention(h, h, h, need_weights=False)[0]
        h = self.drop(self.down(F.gelu(self.up(self.norm2(x)))))
        x = x + self.gamma2 * h + (h if self.share else 0)
        return self.head(self.final(x)[:, 0])


def test_layer_scale_folds_into_the_layer_that_writes_it():
    spec = infer_spec(LayerScaled().eval(), torch.randn(2, 5, 3))
    scales = [(fold.gain, [(w.weight, w.axis, w.bias) for w in fold.writers]) for fold in spec.norm_folds if fold.op == "layer_scale"]
    # the attention's output projection is inside nn.MultiheadAttention: its product is no foldable LayerScale
    assert scales == [("gamma2", [("down.weight", 0, "down.bias")])]
    assert spec["inp"].folded is None  # gamma1 still limits the stream
    _same_function(LayerScaled(), (torch.randn(2, 5, 3, dtype=torch.float64),))
    shared = infer_spec(LayerScaled(share=True).eval(), torch.randn(2, 5, 3))
    assert not [fold for fold in shared.norm_folds if fold.op == "layer_scale"]  # down's output is read twice


class LayerScaledLinear(nn.Module):
    """One pre-LayerNorm MLP block with LayerScale after a dropout, read by a final norm and head."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.inp, self.norm, self.final = nn.Linear(3, width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.up, self.down, self.drop = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Dropout(0.1)
        self.gamma = nn.Parameter(torch.ones(width))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.gamma * self.drop(self.down(F.gelu(self.up(self.norm(x)))))
        return self.head(self.final(x))


def test_folding_layer_scale_gives_the_stream_its_orthogonal_maps(tmp_path):
    spec = infer_spec(LayerScaledLinear().eval(), torch.randn(2, 3))
    stream = spec["inp"]
    assert stream.kind == "permutation" and (stream.folded.kind, stream.folded.fixes_ones) == ("orthogonal", True)
    _same_function(LayerScaledLinear(), (torch.randn(4, 3, dtype=torch.float64),))
    for seed in (1, 2):
        _same_function(LayerScaledLinear(), (torch.randn(4, 3, dtype=torch.float64),), seed=seed)
    path = tmp_path / "spec.yaml"
    spec.to_yaml(path)
    assert PermutationSpec.from_yaml(path).norm_folds == spec.norm_folds


def test_to_gauge_gives_back_the_reference_layer_scale():
    model = LayerScaledLinear().double().eval()
    with torch.no_grad():
        model.gamma.copy_(torch.linspace(0.5, 2.0, 8, dtype=torch.float64))
    spec = infer_spec(model, torch.randn(2, 3, dtype=torch.float64))
    _, canonical = canonicalize(spec, model.state_dict())
    assert torch.equal(canonical["gamma"], torch.ones(8, dtype=torch.float64))
    back = to_gauge(spec, canonical, model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.allclose(back[name], tensor, atol=1e-12), name


class Functional(nn.Module):
    """``F.layer_norm`` / ``F.rms_norm`` with parameters, read by ``x @ W`` and by a mean over tokens."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.gain, self.bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.rms_gain = nn.Parameter(torch.ones(width))
        self.weight = nn.Parameter(torch.randn(width, width))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + F.layer_norm(x, (x.shape[-1],), self.gain, self.bias) @ self.weight
        return self.head(F.rms_norm(x, (x.shape[-1],), self.rms_gain).mean(1))


def test_functional_norms_and_matmul_readers():
    spec = infer_spec(Functional(), torch.randn(2, 5, 3))
    assert [(fold.op, fold.gain, [(r.weight, r.axis, r.bias) for r in fold.readers]) for fold in spec.norm_folds] == [
        ("layer_norm", "gain", [("weight", 0, None)]), ("rms_norm", "rms_gain", [("head.weight", 1, "head.bias")])]
    assert not spec.norm_folds[0].folds_bias  # x @ W has no bias: the norm's bias stays
    assert spec["inp"].folded.kind == "orthogonal" and spec["inp"].folded.fixes_ones
    _same_function(Functional(), (torch.randn(2, 5, 3, dtype=torch.float64),))


class NotFoldable(nn.Module):
    """Norms whose gains must stay: read by a nonlinearity, shared, a model output, read by a tied head."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.embed = nn.Embedding(7, width)
        self.act_norm, self.shared = nn.LayerNorm(width), nn.LayerNorm(width)
        self.up = nn.Linear(width, width)
        self.final = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens)
        x = x + self.up(F.gelu(self.act_norm(x)))
        x = x + self.up(self.shared(x)) + self.shared(x * 2)
        return F.linear(self.final(x), self.embed.weight), self.act_norm(x)


def test_other_readers_keep_the_gain():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(NotFoldable(), torch.randint(0, 7, (2, 4)))
    assert spec.norm_folds == ()
    assert all(group.folded is None for group in spec.groups)


def test_hugging_face_models():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8,
                                                                 use_cache=False))
    tokens = torch.randint(0, 20, (1, 6))
    spec = infer_spec(gpt2.eval(), (tokens,))
    # Conv1D reads through a view and addmm with its (in, out) weight; ln_f feeds the tied head
    assert [(fold.gain, [(r.weight, r.axis, r.bias) for r in fold.readers]) for fold in spec.norm_folds] == [
        ("transformer.h.0.ln_1.weight", [("transformer.h.0.attn.c_attn.weight", 0, "transformer.h.0.attn.c_attn.bias")]),
        ("transformer.h.0.ln_2.weight", [("transformer.h.0.mlp.c_fc.weight", 0, "transformer.h.0.mlp.c_fc.bias")])]
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=20, max_position_embeddings=8, use_cache=False))
    spec = infer_spec(llama.eval(), (tokens,))
    assert [fold.gain for fold in spec.norm_folds] == [
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"]
    assert {fold.op for fold in spec.norm_folds} == {"rms_norm"}
    stream = spec["model.embed_tokens"]
    assert stream.kind == "permutation" and (stream.folded.kind, stream.folded.fixes_ones) == ("orthogonal", False)
