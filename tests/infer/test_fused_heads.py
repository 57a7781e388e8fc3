"""Heads of fused projections cut by slices and splits: Phi-3's sliced qkv, Falcon's layouts.

Phi-3 slices one ``qkv_proj`` output into query, key and value blocks and views each as
``(heads, head_dim)``. Falcon views its ``query_key_value`` output as heads first and then cuts
that heads axis three ways: multi-query (``split([H, 1, 1])``: one key and one value head for
all query heads), grouped (each key/value group holds its query heads, then its key and its
value head: slice and select after a second view) and interleaved (``(H, 3, D)``, unbound).

Reasoned out by hand, for every layout:

* the heads move as units across the query, key and value blocks and the output projection:
  with several key/value heads the group runs over them, and the query heads sharing one get
  a group fibred over it (grouped-query attention, as for LLaMA); with one key/value head the
  query heads are the units and the key/value head stays put;
* the value dims move, per key/value head, on the value block and the output projection; with
  one value head every query head reads it, so one permutation serves them all;
* rotary embeddings pin the query/key dims; with ALiBi (no rotary) they move, separately from
  the value dims, and the heads stay fixed (the slopes differ per head).

Each model is checked three ways: random permutations of the inferred spec leave the outputs
unchanged in float64 (soundness); the head units are the ones derived above (completeness);
weight matching recovers a planted permutation exactly. A small module without transformers
repeats the layouts under both tracers.
"""

from __future__ import annotations

import copy
import math
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from autoperm import apply_permutation, infer_spec, random_permutation, weight_matching
from autoperm.spec import PermutationGroup, PermutationSpec
from autoperm.spec.apply import layout_positions
from autoperm.verify import verify_spec
from tests.conftest import perturb_

HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB = 32, 4, 8, 2, 50


# ------------------------------------------------------------------ shared checks
def _sound(model: nn.Module, spec: PermutationSpec, inputs: tuple, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """Random permutations of every group leave the float64 outputs unchanged (~1e-10).

    Hugging Face's RMSNorm computes in float32 whatever its input, which alone changes the
    outputs by ~1e-7 when the stream is permuted; the copy checked here runs it in float64.
    """
    model = copy.deepcopy(model).double().eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm, module)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = _logits(model(*inputs))
        for seed in seeds:
            permuted = apply_permutation(spec, random_permutation(spec, seed=seed), state)
            assert any(not torch.equal(permuted[k], state[k]) for k in state), f"seed {seed} moved nothing"
            model.load_state_dict(permuted)
            change = float((_logits(model(*inputs)) - reference).abs().max() / reference.abs().max())
            model.load_state_dict(state)
            assert change < 1e-10, f"seed {seed}: relative change {change:.3g}"


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's RMSNorm in the input's precision."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _logits(output: object) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _planted(spec: PermutationSpec, state_a: dict[str, torch.Tensor]) -> None:
    """Weight matching undoes a random permutation of the spec exactly."""
    state_a = {k: v.double() if v.is_floating_point() else v for k, v in state_a.items()}
    state_b = apply_permutation(spec, random_permutation(spec, seed=7), state_a)
    result = weight_matching(spec, state_a, state_b)
    aligned = apply_permutation(spec, result.perms, state_b)
    wrong = [k for k in state_a if not torch.equal(aligned[k], state_a[k])]
    assert not wrong, f"not recovered: {wrong[:4]}"


def _rows(group: PermutationGroup, param: str, axis: int, unit: bool = False) -> set[int]:
    """The indices of ``param``'s ``axis`` that ``group`` moves (``unit``: one by one, not as blocks)."""
    rows: set[int] = set()
    for member in group.members:
        if member.param == param and member.axis == axis and (member.inner == 1 or not unit):
            rows.update(layout_positions(member, group.size).flatten().tolist())
    return rows


# ------------------------------------------------------------ transformers models
@dataclass(frozen=True)
class Case:
    """A Hugging Face model, where its fused projection puts each block, and what should move.

    ``blocks(layer)`` maps ``"q"``, ``"k"``, ``"v"`` to the rows of the fused weight that block
    holds. ``heads``: size of the heads group (``None``: heads fixed); ``queries``: size of the
    query-head group fibred over it (``None``: none); ``per_head_values``: the value dims are
    fibred over the heads (else one group for all); ``moving_qk``: a query/key-dims group exists.
    """

    build: Callable[[], nn.Module]
    qkv: str
    out: str
    kv_heads: int
    layout: str
    heads: int | None
    queries: int | None
    per_head_values: bool
    moving_qk: bool

    def blocks(self) -> dict[str, list[int]]:
        d, h, g = HEAD_DIM, HEADS, self.kv_heads
        if self.layout == "sliced":  # [q heads | k heads | v heads]
            return {"q": list(range(h * d)), "k": list(range(h * d, (h + g) * d)), "v": list(range((h + g) * d, (h + 2 * g) * d))}
        if self.layout == "grouped":  # per key/value group: [its query heads | k | v]
            width = (h // g + 2) * d
            return {
                "q": [i for j in range(g) for i in range(j * width, j * width + (h // g) * d)],
                "k": [i for j in range(g) for i in range(j * width + (h // g) * d, j * width + (h // g + 1) * d)],
                "v": [i for j in range(g) for i in range(j * width + (h // g + 1) * d, (j + 1) * width)],
            }
        # interleaved: per head [q | k | v]
        return {name: [i for j in range(h) for i in range((3 * j + n) * d, (3 * j + n + 1) * d)] for n, name in enumerate("qkv")}


def _phi3(kv_heads: int, **extra: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        config = transformers.Phi3Config(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
            use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0, **extra,
        )
        return transformers.Phi3ForCausalLM(config)

    return build


def _falcon(**extra: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        config = transformers.FalconConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB, use_cache=False,
            bos_token_id=0, eos_token_id=0, **extra,
        )
        return transformers.FalconForCausalLM(config)

    return build


PHI3 = ("model.layers.{}.self_attn.qkv_proj.weight", "model.layers.{}.self_attn.o_proj.weight")
FALCON = ("transformer.h.{}.self_attention.query_key_value.weight", "transformer.h.{}.self_attention.dense.weight")
CASES: dict[str, Case] = {
    # grouped-query attention: 2 key/value heads of 2 query heads each
    "phi3_gqa": Case(_phi3(2), *PHI3, kv_heads=2, layout="sliced", heads=2, queries=2, per_head_values=True, moving_qk=False),
    "phi3_mha": Case(_phi3(HEADS), *PHI3, kv_heads=HEADS, layout="sliced", heads=HEADS, queries=None, per_head_values=True,
                     moving_qk=False),
    # one key/value head: the query heads are the units
    "phi3_mqa": Case(_phi3(1), *PHI3, kv_heads=1, layout="sliced", heads=HEADS, queries=None, per_head_values=False,
                     moving_qk=False),
    # FalconConfig's default: multi-query, rotary
    "falcon_mqa": Case(_falcon(multi_query=True), *FALCON, kv_heads=1, layout="sliced", heads=HEADS, queries=None,
                       per_head_values=False, moving_qk=False),
    "falcon_mqa_alibi": Case(_falcon(multi_query=True, alibi=True), *FALCON, kv_heads=1, layout="sliced", heads=None,
                             queries=None, per_head_values=False, moving_qk=True),
    "falcon_grouped": Case(_falcon(new_decoder_architecture=True, num_kv_heads=2), *FALCON, kv_heads=2, layout="grouped",
                           heads=2, queries=2, per_head_values=True, moving_qk=False),
    "falcon_grouped_one_kv_head": Case(_falcon(new_decoder_architecture=True, num_kv_heads=1), *FALCON, kv_heads=1,
                                       layout="grouped", heads=HEADS, queries=None, per_head_values=False, moving_qk=False),
    "falcon_interleaved": Case(_falcon(multi_query=False), *FALCON, kv_heads=HEADS, layout="interleaved", heads=HEADS,
                               queries=None, per_head_values=True, moving_qk=False),
}


class Models:
    """Builds each model and infers its spec once per module."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[nn.Module, tuple, PermutationSpec]] = {}

    def get(self, name: str) -> tuple[nn.Module, tuple, PermutationSpec]:
        if name not in self._cache:
            torch.manual_seed(0)
            model = perturb_(CASES[name].build().eval(), scale=0.02)
            tokens = (torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1)),)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spec = infer_spec(model, tokens)
            self._cache[name] = (model, tokens, spec)
        return self._cache[name]


@pytest.fixture(scope="module")
def models() -> Iterator[Models]:
    yield Models()


@pytest.mark.parametrize("name", sorted(CASES))
def test_permutations_preserve_outputs(models: Models, name: str) -> None:
    model, tokens, spec = models.get(name)
    _sound(model, spec, tokens)
    report = verify_spec(model, spec, tokens, seed=0)  # each group's own kind too (orthogonal, invertible)
    assert report.passed, f"max |diff| {report.max_abs_diff:.3g}, failing {report.details}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_head_units(models: Models, name: str) -> None:
    case = CASES[name]
    spec = models.get(name)[2]
    blocks = case.blocks()
    for layer in range(LAYERS):
        qkv, out = case.qkv.format(layer), case.out.format(layer)
        on_out = [g for g in spec.active_groups if _rows(g, out, 1)]
        heads = [g for g in on_out if g.per is None and all(m.inner > 1 for m in g.members if m.param == out)]
        if case.heads is None:
            assert heads == [], [g.name for g in heads]
        else:
            assert len(heads) == 1, [g.name for g in on_out]
            assert heads[0].size == case.heads
            moved = _rows(heads[0], qkv, 0)
            expected = blocks["q"] if case.kv_heads == 1 else blocks["q"] + blocks["k"] + blocks["v"]
            assert moved == set(expected)  # one key/value head: it stays put
        queries = [g for g in on_out if heads and g.per == heads[0].name and g.size == case.queries]
        if case.queries is not None:
            assert len(queries) == 1 and _rows(queries[0], qkv, 0) == set(blocks["q"])

        values = [g for g in spec.active_groups if _rows(g, qkv, 0, unit=True) & set(blocks["v"])]
        assert len(values) == 1, [g.name for g in values]
        assert values[0].size == HEAD_DIM and _rows(values[0], qkv, 0, unit=True) == set(blocks["v"])
        assert _rows(values[0], out, 1) == set(range(HEADS * HEAD_DIM))  # every query head's output dims
        assert values[0].per == (heads[0].name if case.per_head_values else None)

        query_key = [g for g in spec.active_groups if _rows(g, qkv, 0, unit=True) & set(blocks["k"])]
        if case.moving_qk:  # the query/key dims move apart from the value dims
            assert len(query_key) == 1 and query_key[0].size == HEAD_DIM
            assert _rows(query_key[0], qkv, 0, unit=True) == set(blocks["q"] + blocks["k"])
        else:  # rotary embeddings pin them
            assert query_key == []
            assert not any(_rows(g, qkv, 0, unit=True) & set(blocks["q"]) for g in spec.active_groups)


@pytest.mark.parametrize("name", sorted(CASES))
def test_planted_permutation_is_recovered(models: Models, name: str) -> None:
    model, _, spec = models.get(name)
    _planted(spec, model.state_dict())


def test_phi3_partial_rotary_moves_the_pass_through_dims() -> None:
    """With half the head dims rotated, the other half moves per key/value head on q and k."""
    torch.manual_seed(0)
    model = perturb_(_phi3(2, partial_rotary_factor=0.5)().eval(), scale=0.02)
    tokens = (torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1)),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, tokens)
    _sound(model, spec, tokens)
    blocks = CASES["phi3_gqa"].blocks()
    for layer in range(LAYERS):
        qkv = PHI3[0].format(layer)
        query_key = [g for g in spec.active_groups if _rows(g, qkv, 0, unit=True) & set(blocks["k"])]
        assert len(query_key) == 1 and query_key[0].size == HEAD_DIM // 2 and query_key[0].per is not None
        passed = {i for i in blocks["q"] + blocks["k"] if i % HEAD_DIM >= HEAD_DIM // 2}
        assert _rows(query_key[0], qkv, 0, unit=True) == passed


# ------------------------------------------------------------- without transformers
class FusedHeads(nn.Module):
    """One fused projection cut into query, key and value heads the ways Phi-3 and Falcon do.

    ``sliced``: slices of the projection, each viewed as heads (Phi-3); ``multi_query``: a view
    as heads, split ``[H, 1, 1]`` (Falcon); ``grouped``: views as key/value groups, then slice
    and select inside each group (Falcon's new decoder architecture). No rotary embedding, so
    the query/key dims move too.
    """

    def __init__(self, heads: int, kv_heads: int, head_dim: int, layout: str) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.layout = heads, kv_heads, head_dim, layout
        dim = heads * head_dim
        self.inp = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        batch, tokens, dim = x.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        fused = self.qkv(x)
        if self.layout == "sliced":
            q = fused[..., : heads * head_dim].view(batch, tokens, heads, head_dim)
            k = fused[..., heads * head_dim: (heads + kv_heads) * head_dim].view(batch, tokens, kv_heads, head_dim)
            v = fused[..., (heads + kv_heads) * head_dim:].view(batch, tokens, kv_heads, head_dim)
        elif self.layout == "multi_query":
            q, k, v = fused.view(batch, tokens, -1, head_dim).split([heads, 1, 1], dim=2)
        else:
            grouped = fused.view(batch, tokens, -1, head_dim).view(batch, tokens, kv_heads, -1, head_dim)
            q = grouped[..., :-2, :].flatten(2, 3)
            k, v = grouped[..., -2, :], grouped[..., -1, :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.head(x + self.proj(out))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize(("layout", "kv_heads"), [("sliced", 2), ("sliced", 1), ("sliced", 4), ("multi_query", 1),
                                                  ("grouped", 2), ("grouped", 1)])
def test_fused_heads_module(layout: str, kv_heads: int, tracer: str) -> None:
    heads, head_dim = 4, 3
    torch.manual_seed(0)
    model = perturb_(FusedHeads(heads, kv_heads, head_dim, layout)).double().eval()
    x = (torch.randn(2, 5, 5, dtype=torch.float64),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, x, tracer=tracer)
    _sound(model, spec, x)
    # the stream; then heads (the key/value heads, or the query heads where there is one
    # key/value head), the query heads per key/value head, the query/key and the value dims
    expected = [heads * head_dim, kv_heads if kv_heads > 1 else heads, head_dim, head_dim]
    if 1 < kv_heads < heads:
        expected.append(heads // kv_heads)
    assert sorted(g.size for g in spec.active_groups) == sorted(expected)
    assert sum(g.per is not None for g in spec.active_groups) == (len(expected) - 2 if kv_heads > 1 else 0)
    assert spec.completeness().share == 1.0
    _planted(spec, model.state_dict())
