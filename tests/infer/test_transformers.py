"""Inference on Hugging Face transformers definitions: attention heads, tied weights, gated MLPs.

Small configs (hidden 64, 4 heads of 16 dims, MLP 128, 2 layers), random weights, no downloads.
For each model the symmetries are reasoned out by hand and checked exactly:

* residual stream: one group through the embeddings, every block's in/out projections, every
  norm, the final norm and the head, unless the stream itself is a model output (``BertModel``
  and ``ViTModel`` return ``last_hidden_state``, so there it must stay fixed);
* MLP hidden units (SwiGLU: gate and up projections in the same group);
* heads as units across Q, K, V and the output projection, and inside each head one permutation
  of the query/key dims and one of the value/output dims, each *fibred* over the heads (one
  permutation per head);
* LLaMA: rotary embeddings pin the query/key dims (no group may touch them); grouped-query
  attention makes the heads group run over the key/value heads, with a fibred group of the
  query heads that share each key/value head.

Soundness is checked for several seeds. Skipped where transformers is not installed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from autoperm.infer import infer_spec  # noqa: E402
from autoperm.spec import PermutationGroup, PermutationSpec, apply_permutation, random_permutation  # noqa: E402
from autoperm.verify import verify_spec  # noqa: E402
from tests.conftest import group_of, only_group  # noqa: E402

HIDDEN, HEADS, HEAD_DIM, MLP, LAYERS, VOCAB = 64, 4, 16, 128, 2, 100
KV_HEADS = 2  # LLaMA's grouped-query attention: 2 query heads per key/value head


@dataclass(frozen=True)
class Case:
    """A model to build, its example input, and the number of active groups derived by hand."""

    build: Callable[[str], nn.Module]
    inputs: Callable[[], object]
    expected_groups: int


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))


def _image() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _with_attention(config, implementation: str):
    config._attn_implementation = implementation
    return config


def _bert_config(implementation: str):
    return _with_attention(
        transformers.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
            vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
        ),
        implementation,
    )


def _gpt2_config(implementation: str):
    return _with_attention(
        transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64, use_cache=False,
            bos_token_id=0, eos_token_id=0,
        ),
        implementation,
    )


def _llama_config(implementation: str):
    return _with_attention(
        transformers.LlamaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            intermediate_size=MLP, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
            use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        ),
        implementation,
    )


def _vit_config(implementation: str):
    return _with_attention(
        transformers.ViTConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
            image_size=32, patch_size=8, num_labels=10,
        ),
        implementation,
    )


PER_LAYER = 4  # heads, query/key dims, value dims, MLP hidden
CASES: dict[str, Case] = {
    # The stream is last_hidden_state (an output) and the pooler output is an output: fixed.
    "bert": Case(lambda a: transformers.BertModel(_bert_config(a)), _tokens, LAYERS * PER_LAYER),
    # Logits over 3 labels: the stream (word/position/token-type embeddings, every LayerNorm) is
    # free, and so is the pooler's tanh layer in front of the classifier: 2 more.
    "bert_cls": Case(
        lambda a: transformers.BertForSequenceClassification(_bert_config(a)), _tokens, LAYERS * PER_LAYER + 2
    ),
    # Logits over the vocabulary: stream (wte tied to lm_head, wpe, LayerNorms, ln_f): 1 more.
    "gpt2": Case(lambda a: transformers.GPT2LMHeadModel(_gpt2_config(a)), _tokens, LAYERS * PER_LAYER + 1),
    # Stream (embed_tokens, RMSNorms, lm_head) 1; per layer: key/value heads, query heads within
    # a key/value group, value dims, SwiGLU hidden (RoPE leaves no query/key-dims group): 4.
    "llama": Case(lambda a: transformers.LlamaForCausalLM(_llama_config(a)), _tokens, LAYERS * PER_LAYER + 1),
    # last_hidden_state and pooler output are outputs: stream fixed.
    "vit": Case(lambda a: transformers.ViTModel(_vit_config(a)), _image, LAYERS * PER_LAYER),
    # Logits: the stream (patch projection, class token, position embeddings, LayerNorms) is free.
    "vit_cls": Case(
        lambda a: transformers.ViTForImageClassification(_vit_config(a)), _image, LAYERS * PER_LAYER + 1
    ),
}


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every floating state entry (LayerNorm's ones and zeros included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.02 * torch.randn(value.shape, generator=generator))
    return model


class Models:
    """Builds each (model, attention implementation) once per module."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[nn.Module, object, PermutationSpec]] = {}

    def get(self, name: str, implementation: str = "sdpa") -> tuple[nn.Module, object, PermutationSpec]:
        key = (name, implementation)
        if key not in self._cache:
            torch.manual_seed(0)
            model = perturb_(CASES[name].build(implementation).eval())
            example = CASES[name].inputs()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spec = infer_spec(model, example)
            self._cache[key] = (model, example, spec)
        return self._cache[key]


@pytest.fixture(scope="module")
def models() -> Iterator[Models]:
    yield Models()


def has(group: PermutationGroup, param: str, axis: int) -> bool:
    return any(m.param == param and m.axis == axis for m in group.members)


def first_present(state_dict: dict[str, torch.Tensor], *names: str) -> str:
    """The first of ``names`` in the state dict (parameter names differ across transformers versions)."""
    for name in names:
        if name in state_dict:
            return name
    raise KeyError(f"none of {names} in the state dict")


@dataclass(frozen=True)
class Layer:
    """State-dict names of one block with separate Q, K, V, O projections and a two-layer MLP."""

    q: str
    k: str
    v: str
    o: str
    up: tuple[str, ...]
    down: str
    norms: tuple[str, ...]


def bert_layer(prefix: str, i: int) -> Layer:
    base = f"{prefix}encoder.layer.{i}"
    return Layer(
        q=f"{base}.attention.self.query.weight", k=f"{base}.attention.self.key.weight",
        v=f"{base}.attention.self.value.weight", o=f"{base}.attention.output.dense.weight",
        up=(f"{base}.intermediate.dense.weight",), down=f"{base}.output.dense.weight",
        norms=(f"{base}.attention.output.LayerNorm.weight", f"{base}.output.LayerNorm.weight"),
    )


def llama_layer(i: int) -> Layer:
    base = f"model.layers.{i}"
    return Layer(
        q=f"{base}.self_attn.q_proj.weight", k=f"{base}.self_attn.k_proj.weight",
        v=f"{base}.self_attn.v_proj.weight", o=f"{base}.self_attn.o_proj.weight",
        up=(f"{base}.mlp.gate_proj.weight", f"{base}.mlp.up_proj.weight"), down=f"{base}.mlp.down_proj.weight",
        norms=(f"{base}.input_layernorm.weight", f"{base}.post_attention_layernorm.weight"),
    )


def vit_layer(state_dict: dict[str, torch.Tensor], prefix: str, i: int) -> Layer:
    new, old = f"{prefix}layers.{i}", f"{prefix}encoder.layer.{i}"  # transformers 5 / 4 names

    def pick(new_suffix: str, old_suffix: str) -> str:
        return first_present(state_dict, f"{new}.{new_suffix}", f"{old}.{old_suffix}")

    return Layer(
        q=pick("attention.q_proj.weight", "attention.attention.query.weight"),
        k=pick("attention.k_proj.weight", "attention.attention.key.weight"),
        v=pick("attention.v_proj.weight", "attention.attention.value.weight"),
        o=pick("attention.o_proj.weight", "attention.output.dense.weight"),
        up=(pick("mlp.fc1.weight", "intermediate.dense.weight"),),
        down=pick("mlp.fc2.weight", "output.dense.weight"),
        norms=(pick("layernorm_before.weight", "layernorm_before.weight"),
               pick("layernorm_after.weight", "layernorm_after.weight")),
    )


def check_attention(spec: PermutationSpec, layer: Layer, kv_heads: int = HEADS, rotary: bool = False) -> None:
    """Heads across Q, K, V, O; fibred query/key and value/output dims (see the module docstring)."""
    queries_per_kv = HEADS // kv_heads
    on_q = group_of(spec, layer.q, 0)
    heads = [g for g in on_q if g.per is None]
    assert len(heads) == 1, [g.name for g in on_q]
    head = heads[0]
    assert head.size == kv_heads
    for param, axis, inner in ((layer.q, 0, HEAD_DIM * queries_per_kv), (layer.k, 0, HEAD_DIM),
                               (layer.v, 0, HEAD_DIM), (layer.o, 1, HEAD_DIM * queries_per_kv)):
        found = [m for m in head.members if m.param == param and m.axis == axis]
        assert len(found) == 1 and found[0].inner == inner, (param, found)

    fibred_q = [g for g in on_q if g.per is not None]
    fibred_k = [g for g in group_of(spec, layer.k, 0) if g.per is not None]
    if rotary:
        # RoPE rotates (i, i + d/2) pairs at per-pair frequencies: no query/key dim may move.
        assert fibred_k == []
        # The query heads sharing one key/value head can be permuted, separately per group.
        assert len(fibred_q) == 1 and fibred_q[0].size == queries_per_kv and fibred_q[0].per == head.name
        assert has(fibred_q[0], layer.o, 1) and not has(fibred_q[0], layer.k, 0)
    else:
        assert len(fibred_q) == len(fibred_k) == 1 and fibred_q[0] is fibred_k[0]
        qk = fibred_q[0]
        assert qk.size == HEAD_DIM and qk.per == head.name
        assert not has(qk, layer.v, 0) and not has(qk, layer.o, 1)

    value_dims = [g for g in group_of(spec, layer.v, 0) if g.per is not None]
    assert len(value_dims) == 1, [g.name for g in value_dims]
    assert value_dims[0].size == HEAD_DIM and value_dims[0].per == head.name
    assert has(value_dims[0], layer.o, 1) and not has(value_dims[0], layer.q, 0)


def check_mlp(spec: PermutationSpec, layer: Layer) -> None:
    hidden = only_group(spec, layer.up[0], 0)
    assert hidden.size == MLP and hidden.per is None
    for param in layer.up:
        assert only_group(spec, param, 0) is hidden
    assert only_group(spec, layer.down, 1) is hidden


def check_stream(
    spec: PermutationSpec, anchor: tuple[str, int], layers: list[Layer], extra: list[tuple[str, int]]
) -> PermutationGroup:
    """One stream group: the anchor, every norm, every block's in/out projections, ``extra``."""
    stream = only_group(spec, *anchor)
    assert stream.size == HIDDEN and stream.per is None
    for layer in layers:
        writes_or_reads = [(layer.o, 0), (layer.down, 0), (layer.q, 1), (layer.up[0], 1)]
        for param, axis in [(norm, 0) for norm in layer.norms] + writes_or_reads:
            assert stream in group_of(spec, param, axis), (param, axis)
    for param, axis in extra:
        assert only_group(spec, param, axis) is stream, (param, axis)
    return stream


# ------------------------------------------------------------------------------ soundness
@pytest.mark.parametrize("name", sorted(CASES))
def test_random_permutation_preserves_outputs(models: Models, name: str) -> None:
    model, example, spec = models.get(name)
    for seed in (0, 1, 2):
        report = verify_spec(model, spec, example, seed=seed)
        difference = f"max |diff| {report.max_abs_diff:.3g} (rel {report.max_rel_diff:.3g})"
        assert report.passed, f"{name} seed {seed}: {difference}"
        assert report.groups == len(spec.active_groups)
        assert report.permuted_tensors == len(spec.members_by_param)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_eager_attention_is_found_and_sound(models: Models, name: str) -> None:
    """matmul + softmax attention gives the same structure as scaled_dot_product_attention."""
    model, example, spec = models.get(name, "eager")
    assert verify_spec(model, spec, example, seed=0).passed
    reference = models.get(name, "sdpa")[2]
    shape = sorted((g.size, g.per is not None) for g in spec.active_groups)
    assert shape == sorted((g.size, g.per is not None) for g in reference.active_groups)


# --------------------------------------------------------------------------- completeness
@pytest.mark.parametrize("name", sorted(CASES))
def test_group_count_matches_derivation(models: Models, name: str) -> None:
    spec = models.get(name)[2]
    listing = ", ".join(f"{g.name}:{g.size}" + (f" per {g.per}" if g.per else "") for g in spec.active_groups)
    assert len(spec.active_groups) == CASES[name].expected_groups, listing


@pytest.mark.parametrize("name", ["bert", "bert_cls"])
def test_bert_groups(models: Models, name: str) -> None:
    spec = models.get(name)[2]
    prefix = "" if name == "bert" else "bert."
    layers = [bert_layer(prefix, i) for i in range(LAYERS)]
    for layer in layers:
        check_attention(spec, layer)
        check_mlp(spec, layer)
    if name == "bert":
        assert group_of(spec, "embeddings.word_embeddings.weight", 1) == []  # last_hidden_state is an output
        assert group_of(spec, "pooler.dense.weight", 0) == []  # pooler_output is an output
    else:
        check_stream(spec, ("bert.embeddings.word_embeddings.weight", 1), layers, [
            ("bert.embeddings.position_embeddings.weight", 1), ("bert.embeddings.token_type_embeddings.weight", 1),
            ("bert.embeddings.LayerNorm.weight", 0), ("bert.pooler.dense.weight", 1),
        ])
        pooler = only_group(spec, "bert.pooler.dense.weight", 0)
        assert pooler.size == HIDDEN and only_group(spec, "classifier.weight", 1) is pooler


def test_bert_keyword_inputs_with_attention_mask(models: Models) -> None:
    model = models.get("bert")[0]
    tokens = _tokens()
    inputs = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, inputs)
    assert len(spec.active_groups) == CASES["bert"].expected_groups
    assert verify_spec(model, spec, inputs, seed=0).passed


def test_gpt2_groups_and_tied_embedding(models: Models) -> None:
    model, _, spec = models.get("gpt2")
    stream = only_group(spec, "transformer.wte.weight", 1)
    assert stream.size == HIDDEN
    assert only_group(spec, "lm_head.weight", 1) is stream  # tied: one parameter, permuted once
    for param, axis in [("transformer.wpe.weight", 1), ("transformer.ln_f.weight", 0)]:
        assert only_group(spec, param, axis) is stream
    permuted = apply_permutation(spec, random_permutation(spec, seed=0), model.state_dict())
    assert torch.equal(permuted["transformer.wte.weight"], permuted["lm_head.weight"])
    assert not torch.equal(permuted["lm_head.weight"], model.state_dict()["lm_head.weight"])

    for i in range(LAYERS):
        base = f"transformer.h.{i}"
        c_attn, c_proj = f"{base}.attn.c_attn.weight", f"{base}.attn.c_proj.weight"  # Conv1D: (in, out)
        assert stream in group_of(spec, c_attn, 0) and stream in group_of(spec, f"{base}.ln_1.weight", 0)
        assert stream in group_of(spec, c_proj, 1) and stream in group_of(spec, f"{base}.mlp.c_proj.weight", 1)
        heads = [g for g in group_of(spec, c_attn, 1) if g.per is None and g is not stream]
        assert len(heads) == 1 and heads[0].size == HEADS
        offsets = sorted(m.offset for m in heads[0].members if m.param == c_attn and m.axis == 1)
        assert offsets == [0, HIDDEN, 2 * HIDDEN]  # q, k, v slices of the fused projection
        assert has(heads[0], c_proj, 0)
        fibred = [g for g in group_of(spec, c_attn, 1) if g.per == heads[0].name]
        assert sorted(g.size for g in fibred) == [HEAD_DIM, HEAD_DIM]
        qk = [g for g in fibred if not has(g, c_proj, 0)]
        value = [g for g in fibred if has(g, c_proj, 0)]
        assert len(qk) == 1 and len(value) == 1
        assert sorted(m.offset for m in qk[0].members if m.param == c_attn) == [0, HIDDEN]
        assert [m.offset for m in value[0].members if m.param == c_attn] == [2 * HIDDEN]
        hidden = only_group(spec, f"{base}.mlp.c_fc.weight", 1)
        assert hidden.size == 4 * HIDDEN and only_group(spec, f"{base}.mlp.c_proj.weight", 0) is hidden


def test_llama_groups(models: Models) -> None:
    spec = models.get("llama")[2]
    layers = [llama_layer(i) for i in range(LAYERS)]
    for layer in layers:
        check_attention(spec, layer, kv_heads=KV_HEADS, rotary=True)
        check_mlp(spec, layer)
    check_stream(spec, ("model.embed_tokens.weight", 1), layers, [("model.norm.weight", 0), ("lm_head.weight", 1)])


@pytest.mark.parametrize("name", ["vit", "vit_cls"])
def test_vit_groups(models: Models, name: str) -> None:
    model, _, spec = models.get(name)
    state_dict = model.state_dict()
    prefix = "" if name == "vit" else "vit."
    layers = [vit_layer(state_dict, prefix, i) for i in range(LAYERS)]
    for layer in layers:
        check_attention(spec, layer)
        check_mlp(spec, layer)
    if name == "vit":
        assert group_of(spec, "embeddings.cls_token", 2) == []  # last_hidden_state is an output
    else:
        layernorm = first_present(state_dict, "vit.layernorm.weight")
        check_stream(spec, ("vit.embeddings.patch_embeddings.projection.weight", 0), layers, [
            ("vit.embeddings.cls_token", 2), ("vit.embeddings.position_embeddings", 2),
            (layernorm, 0), ("classifier.weight", 1),
        ])
