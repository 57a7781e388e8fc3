"""Mixture-of-experts blocks of transformers 5: experts as units, their hidden units, the stream.

Small configs (hidden 32, 2 layers, 4 or 8 experts of 2 chosen per token), random weights, no
downloads. The symmetries, reasoned out by hand:

* experts as units: one permutation of the router's rows and of the leading axis of the stacked
  expert weights (``gate_up_proj``, ``down_proj``), since the router's ``topk`` positions are
  the numbers the experts are read at; DeepSeek-V3 scores experts in groups (``n_group``), so
  there the experts axis is the product of the groups and the experts within each group (one
  permutation per group, fibred over the groups), and ``e_score_correction_bias`` moves too;
* the experts' hidden units: gate and up halves of ``gate_up_proj`` and the inputs of
  ``down_proj``, one permutation per expert (a group fibred over the experts whose members
  run along the hidden axis, the experts on axis 0: ``Member.per_axis``); DeepSeek-V3's experts
  are two groups (expert groups, and the experts within each), so there the hidden units
  stay one permutation shared by the experts of a layer;
* the residual stream through the router's columns and the experts' inputs and outputs, and
  the shared experts (Qwen2-MoE, DeepSeek) as plain gated MLPs.

The routers compute in float32 whatever the model's dtype (``router_logits.float()``), so a
permuted float64 model agrees to float32 rounding of the routing weights: the check is relative
to the output's scale, next to a permutation that breaks the coupling (router rows moved
without their experts) and must change the output.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest
import torch
import yaml
from torch import nn

transformers = pytest.importorskip("transformers")

from autoperm.infer import infer_spec
from autoperm.infer.rules_moe import traceable_experts
from autoperm.solvers import weight_matching
from autoperm.errors import SpecError
from autoperm.spec import PermutationSpec, apply_permutation, invert_permutation, random_permutation
from tests.conftest import group_of, only_group

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96}


def _mixtral() -> nn.Module:
    config = transformers.MixtralConfig(intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, **SMALL)
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe() -> nn.Module:
    config = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **SMALL)
    return transformers.Qwen2MoeForCausalLM(config)


def _deepseek_v3() -> nn.Module:
    config = transformers.DeepseekV3Config(
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, num_key_value_heads=4, **SMALL)
    return transformers.DeepseekV3ForCausalLM(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "deepseek_v3": _deepseek_v3}
EXPERTS = {"mixtral": 4, "qwen2_moe": 4, "deepseek_v3": 8}
HIDDEN = {"mixtral": 48, "qwen2_moe": 24, "deepseek_v3": 24}


def _model(name: str, seed: int = 0) -> nn.Module:
    """A float64 model with weights large enough that routing differs from token to token."""
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval().double()
    model.config._experts_implementation = "eager"  # the loop over experts: an independent reference
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3) if parameter.ndim > 1 else parameter.add_(0.1 * torch.randn_like(parameter))
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model


_SPECS: dict[str, PermutationSpec] = {}


def _spec(name: str) -> PermutationSpec:
    if name not in _SPECS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SPECS[name] = infer_spec(_model(name), torch.zeros(1, 8, dtype=torch.long))
    return _SPECS[name]


def _logits(model: nn.Module, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", list(BUILDERS))
def test_experts_router_rows_and_stacked_weights_share_one_permutation(name: str) -> None:
    spec = _spec(name)
    block = "model.layers.1.mlp"
    router = group_of(spec, f"{block}.gate.weight", 0)
    assert router, "the router's rows (the experts) are kept fixed"
    for param in (f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"):
        assert group_of(spec, param, 0) == router, param
    if name == "deepseek_v3":  # 2 groups of 4 experts: the groups, and one permutation within each group
        assert sorted(g.size for g in router) == [2, 4]
        within = next(g for g in router if g.size == 4)
        assert within.per == next(g for g in router if g.size == 2).name
        assert group_of(spec, f"{block}.gate.e_score_correction_bias", 0) == router
    else:
        assert [g.size for g in router] == [EXPERTS[name]]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_expert_hidden_units_and_residual_stream(name: str) -> None:
    spec = _spec(name)
    block = "model.layers.0.mlp"
    hidden = only_group(spec, f"{block}.experts.down_proj", 2)
    assert hidden.size == HIDDEN[name]
    if name == "deepseek_v3":  # experts in two levels (groups, experts within them): one shared permutation
        assert hidden.per is None and all(m.per_axis is None for m in hidden.members)
    else:  # each expert's own permutation, the experts on axis 0
        assert hidden.per == only_group(spec, f"{block}.gate.weight", 0).name
        assert {(m.param.rsplit(".", 1)[-1], m.axis, m.per_axis) for m in hidden.members} == {
            ("gate_up_proj", 1, 0), ("down_proj", 2, 0)}
    halves = sorted((m.offset, m.inner) for m in hidden.members if m.param == f"{block}.experts.gate_up_proj" and m.axis == 1)
    assert halves == [(0, 1), (HIDDEN[name], 1)], "gate and up halves move together"
    stream = only_group(spec, "model.embed_tokens.weight", 1)
    for param, axis in ((f"{block}.gate.weight", 1), (f"{block}.experts.gate_up_proj", 2), (f"{block}.experts.down_proj", 1),
                        ("lm_head.weight", 1)):
        assert only_group(spec, param, axis) == stream, (param, axis)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_permuted_model_computes_the_same_function(name: str) -> None:
    spec = _spec(name)
    model = _model(name, seed=1)
    state = model.state_dict()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    reference = _logits(model, state, tokens)
    scale = reference.abs().max().item()
    for seed in range(3):
        permuted = apply_permutation(spec, random_permutation(spec, seed=seed), state)
        assert any(not torch.equal(permuted[k], state[k]) for k in state)
        error = (_logits(model, permuted, tokens) - reference).abs().max().item() / scale
        assert error < 1e-5, f"seed {seed}: relative error {error:.2e}"
    router = next(g for g in group_of(spec, "model.layers.0.mlp.gate.weight", 0) if g.per is None)
    rows = {k: v for k, v in state.items()}
    rows["model.layers.0.mlp.gate.weight"] = state["model.layers.0.mlp.gate.weight"].roll(1, dims=0)
    broken = (_logits(model, rows, tokens) - reference).abs().max().item() / scale
    assert broken > 1e-3, f"moving {router.name}'s router rows without their experts changed nothing ({broken:.1e})"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_weight_matching_recovers_a_planted_permutation(name: str) -> None:
    spec = _spec(name)
    state = _model(name, seed=3).state_dict()
    planted = apply_permutation(spec, random_permutation(spec, seed=4), state)
    result = weight_matching(spec, state, planted)
    aligned = apply_permutation(spec, result.perms, planted)
    for key, tensor in state.items():
        assert torch.equal(aligned[key], tensor), key


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_each_experts_own_hidden_permutation_is_recovered(name: str) -> None:
    """Planted: the experts permuted, and every expert's hidden units by a permutation of its own."""
    spec = _spec(name)
    hidden = only_group(spec, "model.layers.1.mlp.experts.down_proj", 2)
    state = _model(name, seed=5).state_dict()
    planted = random_permutation(spec, seed=6)
    rows = planted[hidden.name]
    assert rows.shape == (EXPERTS[name], HIDDEN[name]) and len({tuple(row.tolist()) for row in rows}) == EXPERTS[name]
    result = weight_matching(spec, state, apply_permutation(spec, planted, state))
    for group in spec.active_groups:
        assert torch.equal(result.perms[group.name], invert_permutation(spec, planted)[group.name]), group.name


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_per_expert_groups_round_trip_through_yaml_and_a_wrong_axis_is_refused(name: str) -> None:
    spec = _spec(name)
    text = spec.to_yaml()
    assert PermutationSpec.from_yaml(text) == spec
    hidden = only_group(spec, "model.layers.0.mlp.experts.down_proj", 2)
    data = yaml.safe_load(text)
    entry = next(g for g in data["groups"] if g["name"] == hidden.name)
    entry["members"][-1]["per_axis"] = 1  # down_proj (experts, d, hidden): axis 1 is the stream
    with pytest.raises(SpecError, match=re.escape(hidden.name)):
        PermutationSpec.from_dict(data)


def test_traceable_experts_restores_the_configured_implementation() -> None:
    model = _mixtral()
    model.config._experts_implementation = "grouped_mm"
    with traceable_experts(model):
        assert model.model.layers[0].mlp.experts.config._experts_implementation == "batched_mm"
    assert model.config._experts_implementation == "grouped_mm"
    with pytest.raises(RuntimeError), traceable_experts(model):
        raise RuntimeError("fails inside")
    assert model.config._experts_implementation == "grouped_mm"


_ODD_USES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "plain": lambda chosen: chosen,  # the control: understood, the experts move
    "shifted": lambda chosen: (chosen + 1) % 4,  # reads expert i + 1 for the router's choice i
    "bool mask": lambda chosen: chosen.to(torch.bool).long(),  # expert 0 or 1 only
    "read by itself": lambda chosen: chosen[chosen],
}


@pytest.mark.parametrize("use", list(_ODD_USES))
def test_routing_positions_used_otherwise_keep_the_experts_fixed(use: str) -> None:
    """A router whose expert numbers go anywhere but to a read of the expert weights is not understood."""

    class OddRouter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(8, 4, bias=False)
            self.experts = nn.Parameter(torch.randn(4, 8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            chosen = _ODD_USES[use](self.router(x).topk(1, dim=-1).indices.reshape(-1))
            return torch.bmm(self.experts[chosen], x.unsqueeze(-1)).squeeze(-1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(OddRouter(), torch.randn(4, 8))
    expected = 1 if use == "plain" else 0
    assert len(group_of(spec, "router.weight", 0)) == len(group_of(spec, "experts", 0)) == expected


def test_routing_positions_read_by_index_and_gather_couple_the_experts() -> None:
    """A hand-written top-2 router: weights gathered at the chosen numbers, experts indexed by them."""

    class TopTwo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(8, 6, bias=False)
            self.up = nn.Parameter(torch.randn(6, 10, 8))
            self.down = nn.Parameter(torch.randn(6, 8, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = self.router(x).softmax(-1)
            chosen = scores.topk(2, dim=-1).indices
            weights = scores.gather(1, chosen[:, :2])
            flat = chosen.reshape(-1)
            h = torch.bmm(self.up[flat], x.repeat_interleave(2, dim=0).unsqueeze(-1)).relu()
            y = torch.bmm(self.down[flat], h).squeeze(-1) * weights.reshape(-1, 1)
            return y.view(x.shape[0], 2, -1).sum(1)

    model = TopTwo().double()
    spec = infer_spec(model, torch.randn(5, 8, dtype=torch.float64))
    experts = only_group(spec, "router.weight", 0)
    assert experts.size == 6 and experts == only_group(spec, "up", 0) == only_group(spec, "down", 0)
    assert only_group(spec, "up", 1) == only_group(spec, "down", 2)
    x = torch.randn(7, 8, dtype=torch.float64)
    reference = model(x)
    permuted = apply_permutation(spec, random_permutation(spec, seed=0), model.state_dict())
    model.load_state_dict(permuted)
    torch.testing.assert_close(model(x), reference, rtol=1e-12, atol=1e-12)
