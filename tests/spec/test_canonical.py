"""Canonical form: norm gains folded into their readers, and back into a reference's gauge.

Hand derivation: a pre-norm transformer's residual stream is read by norms with gains, which
keep permutations only. Folded into the linear layers that read them, the gain is 1 and the
bias 0: LayerNorm then keeps the orthogonal maps that fix the all-ones vector (its mean
subtraction: ``mean(Q x) = mean(x)`` iff ``Q^T 1 = 1``), RMSNorm every orthogonal map. A tied
LM head reads the final norm with the embedding's own table, so that norm cannot fold and the
stream keeps permutations. The MLP's hidden units keep their kind (ReLU: scale, GELU: permutation).
Every check of a function runs in float64.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import autoperm
from autoperm import PermutationSpec, SpecError, apply_transform, canonicalize, infer_spec, random_transform, to_gauge
from autoperm.spec import check_transforms
from autoperm.spec.transform import _haar_orthogonal

VOCAB, TOKENS = 11, 5


class DecomposedRMSNorm(nn.Module):
    """Hugging Face's RMSNorm, written out: ``weight * (x * rsqrt(mean(x ** 2) + eps))``."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        hidden = x.to(torch.float64)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + 1e-6)
        return self.weight * hidden.to(dtype)


NORMS = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, "hf_rms": DecomposedRMSNorm}
STREAM_FOLDED = {"layer": ("orthogonal", True), "rms": ("orthogonal", False), "hf_rms": ("orthogonal", False)}


class Block(nn.Module):
    def __init__(self, width: int, norm: str, act: str):
        super().__init__()
        self.norm1, self.norm2 = NORMS[norm](width), NORMS[norm](width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = (t.view(batch, tokens, 2, -1).transpose(1, 2) for t in self.qkv(self.norm1(x)).split(width, dim=-1))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, tokens, width))
        hidden = self.up(self.norm2(x))
        return x + self.down(F.relu(hidden) if self.act == "relu" else F.gelu(hidden))


class LM(nn.Module):
    """Pre-norm language model; the head is tied to the embedding, or its own layer (with or without bias)."""

    def __init__(self, width: int, depth: int, norm: str, act: str, head: str):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.Sequential(*(Block(width, norm, act) for _ in range(depth)))
        self.norm = NORMS[norm](width)
        self.head_kind = head
        if head != "tied":
            self.head = nn.Linear(width, VOCAB, bias=head == "bias")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.embed(tokens)))
        return F.linear(x, self.embed.weight) if self.head_kind == "tied" else self.head(x)


def _model(width: int, depth: int, norm: str, act: str, head: str, seed: int) -> nn.Module:
    """A float64 model whose gains and biases are far from 1 and 0 (an untouched gauge would hide errors)."""
    torch.manual_seed(seed)
    model = LM(width, depth, norm, act, head).double().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
    return model


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)  # strict: same keys and shapes as the model's own
    with torch.no_grad():
        return clone(tokens)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())


MODELS = st.tuples(st.sampled_from([4, 6]), st.integers(1, 2), st.sampled_from(sorted(NORMS)), st.sampled_from(["relu", "gelu"]),
                   st.sampled_from(["tied", "bias", "nobias"]), st.integers(0, 3))
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(MODELS)
def test_kinds_before_and_after_folding(config):
    width, depth, norm, act, head, seed = config
    model = _model(*config)
    spec = infer_spec(model, (_tokens(),))
    stream = spec["embed"]
    assert stream.kind == "permutation" and not stream.fixes_ones
    assert len(spec.norm_folds) == 2 * depth + (head != "tied")
    assert {fold.op for fold in spec.norm_folds} == {"layer_norm" if norm == "layer" else "rms_norm"}
    canonical, _ = canonicalize(spec, model.state_dict())
    if head == "tied":  # the final norm cannot fold: the stream keeps permutations only
        assert stream.folded is None and canonical["embed"].kind == "permutation"
    else:
        kind, fixes_ones = STREAM_FOLDED[norm]
        assert (stream.folded.kind, stream.folded.fixes_ones) == (kind, fixes_ones)
        assert (canonical["embed"].kind, canonical["embed"].fixes_ones) == (kind, fixes_ones)
    gains = {fold.gain for fold in spec.norm_folds}
    assert not gains & {m.param for g in canonical.groups for m in g.members}
    for index in range(depth):  # the MLP's hidden units keep their kind
        name = f"blocks.{index}.up"
        assert spec[name].kind == canonical[name].kind == ("scale" if act == "relu" else "permutation")


@SETTINGS
@given(MODELS)
def test_canonical_form_computes_the_same_function(config):
    model = _model(*config)
    tokens = _tokens(1)
    state = model.state_dict()
    before = {name: tensor.clone() for name, tensor in state.items()}
    spec = infer_spec(model, (_tokens(),))
    canonical, canonical_state = canonicalize(spec, state)
    assert all(torch.equal(state[name], before[name]) for name in state)  # inputs untouched
    assert _close(_run(model, canonical_state, tokens), _run(model, state, tokens))
    for fold in spec.norm_folds:
        assert torch.equal(canonical_state[fold.gain], torch.ones_like(state[fold.gain]))
        if fold.folds_bias:
            assert torch.equal(canonical_state[fold.bias], torch.zeros_like(state[fold.bias]))
    # every transform the canonical spec admits keeps the canonical model's function
    transformed = apply_transform(canonical, random_transform(canonical, seed=config[-1]), canonical_state)
    assert _close(_run(model, transformed, tokens), _run(model, state, tokens))


@SETTINGS
@given(MODELS)
def test_to_gauge_takes_the_reference_gains(config):
    model = _model(*config)
    tokens = _tokens(2)
    spec = infer_spec(model, (_tokens(),))
    canonical, canonical_state = canonicalize(spec, model.state_dict())
    transformed = apply_transform(canonical, random_transform(canonical, seed=5), canonical_state)
    reference = _model(*config[:-1], seed=config[-1] + 7).state_dict()
    moved = to_gauge(spec, transformed, reference)
    assert _close(_run(model, moved, tokens), _run(model, transformed, tokens))
    for fold in spec.norm_folds:
        assert torch.equal(moved[fold.gain], reference[fold.gain])
        if fold.folds_bias:
            assert torch.allclose(moved[fold.bias], reference[fold.bias])
    back = to_gauge(canonical, canonical_state, model.state_dict())  # round trip: the original state dict
    assert all(torch.allclose(back[name], tensor, atol=1e-12) for name, tensor in model.state_dict().items())


def test_layer_norm_stream_needs_ones_fixing_maps():
    """A Haar orthogonal map that moves the all-ones vector changes a LayerNorm model; the check refuses it."""
    model = _model(6, 1, "layer", "gelu", "bias", 0)
    spec = infer_spec(model, (_tokens(),))
    canonical, canonical_state = canonicalize(spec, model.state_dict())
    assert canonical["embed"].fixes_ones
    drawn = random_transform(canonical, seed=0)
    ones = torch.ones(6, dtype=torch.float64)
    assert torch.allclose(drawn["embed"] @ ones, ones) and torch.allclose(drawn["embed"] @ drawn["embed"].T, torch.eye(6, dtype=torch.float64))
    generic = _haar_orthogonal(6, torch.Generator().manual_seed(3))
    loose = PermutationSpec.model_validate({**canonical.model_dump(), "groups": [
        {**g.model_dump(), "fixes_ones": False} for g in canonical.groups]})
    moved = apply_transform(loose, {"embed": generic}, canonical_state)
    assert not _close(_run(model, moved, _tokens(1)), _run(model, canonical_state, _tokens(1)))
    with pytest.raises(SpecError, match="'embed'.*all-ones"):
        check_transforms(canonical, {"embed": generic})


def test_reader_without_bias_keeps_the_norm_bias():
    model = _model(4, 1, "layer", "relu", "nobias", 0)
    spec = infer_spec(model, (_tokens(),))
    final = next(fold for fold in spec.norm_folds if fold.gain == "norm.weight")
    assert not final.folds_bias and final.readers[0].bias is None
    canonical, state = canonicalize(spec, model.state_dict())
    assert "norm.bias" in {m.param for m in canonical["embed"].members}
    assert not torch.equal(state["norm.bias"], torch.zeros(4, dtype=torch.float64))


def test_errors_name_the_parameter():
    model = _model(4, 1, "layer", "relu", "bias", 0)
    spec = infer_spec(model, (_tokens(),))
    state = dict(model.state_dict())
    del state["blocks.0.qkv.weight"]
    with pytest.raises(SpecError, match="blocks.0.qkv.weight"):
        canonicalize(spec, state)
    reference = dict(model.state_dict())
    reference["norm.weight"] = reference["norm.weight"].clone()
    reference["norm.weight"][1] = 0
    with pytest.raises(SpecError, match="norm.weight"):
        to_gauge(spec, model.state_dict(), reference)
    nobias = _model(4, 1, "layer", "relu", "nobias", 0)
    spec = infer_spec(nobias, (_tokens(),))
    state = dict(nobias.state_dict())
    state["norm.weight"] = state["norm.weight"].clone()
    state["norm.weight"][0] = 0
    with pytest.raises(SpecError, match="norm.weight"):
        canonicalize(spec, state)


def test_spec_without_norms_is_unchanged():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    spec = infer_spec(model, torch.randn(2, 3))
    assert spec.norm_folds == () and all(g.folded is None for g in spec.groups)
    text = spec.to_yaml()
    assert "norm_folds" not in text and "folded" not in text and "fixes_ones" not in text
    original = model.state_dict()
    canonical, state = canonicalize(spec, original)
    assert canonical.to_yaml() == text and all(state[name] is tensor for name, tensor in original.items())


def test_yaml_round_trip_keeps_folds():
    model = _model(4, 1, "layer", "relu", "nobias", 0)
    spec = infer_spec(model, (_tokens(),))
    loaded = PermutationSpec.from_yaml(spec.to_yaml())
    assert loaded.norm_folds == spec.norm_folds and loaded.groups == spec.groups
    canonical, _ = canonicalize(spec, model.state_dict())
    assert PermutationSpec.from_yaml(canonical.to_yaml()).groups == canonical.groups
    assert "fixes_ones: true" in canonical.to_yaml()


# ------------------------------------------------------------------ benchmark families
@pytest.fixture(scope="module")
def lmc():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "lmc_families.py"
    module_spec = importlib.util.spec_from_file_location("lmc_families", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["lmc_families"] = module
    module_spec.loader.exec_module(module)
    return module


def _trained_gauge(model: nn.Module) -> nn.Module:
    """Gains and biases far from 1 and 0, as training leaves them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ln" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def test_vit_family_stream_becomes_orthogonal(lmc):
    family = lmc.FAMILIES["vit"]
    model = _trained_gauge(family.build(family.width, 0).double().eval())
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    spec = infer_spec(model, (images,))
    assert spec["patch"].kind == "permutation"
    canonical, state = canonicalize(spec, model.state_dict())
    assert (canonical["patch"].kind, canonical["patch"].fixes_ones) == ("orthogonal", True)
    transformed = apply_transform(canonical, random_transform(canonical, seed=0), state)
    assert _close(_run(model, transformed, images), _run(model, model.state_dict(), images))


def test_gpt_family_tied_head_keeps_permutations(lmc):
    """The GPT family ties its head to the embedding: the final LayerNorm cannot fold, so the
    stream stays ``permutation``; the blocks' norms still fold."""
    family = lmc.FAMILIES["gpt"]
    model = _trained_gauge(family.build(family.width, 0).double().eval())
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    spec = infer_spec(model, (tokens,))
    assert spec["embed"].kind == "permutation" and spec["embed"].folded is None
    assert "ln.weight" not in {fold.gain for fold in spec.norm_folds} and len(spec.norm_folds) == 4
    canonical, state = canonicalize(spec, model.state_dict())
    assert canonical["embed"].kind == "permutation"
    assert _close(_run(model, state, tokens), _run(model, model.state_dict(), tokens))


def test_public_names():
    assert autoperm.canonicalize is canonicalize and autoperm.to_gauge is to_gauge
    assert autoperm.spec.canonicalize is canonicalize
