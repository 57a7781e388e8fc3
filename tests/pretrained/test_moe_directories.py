"""Mixture-of-experts directories: one stored tensor per expert, stacked by transformers when loading.

transformers 5 stores Mixtral's experts as ``block_sparse_moe.experts.E.w1/w2/w3.weight`` and
Qwen2-MoE's and DeepSeek-V3's as ``mlp.experts.E.gate_proj/up_proj/down_proj.weight``, and its
classes hold them stacked (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``). Tiny
models are built from configs (nothing downloaded), saved sharded with ``save_pretrained``
(Qwen2-MoE in bfloat16); B is a planted permutation of A. ``match A B`` must give back A
exactly, written under the stored names, in the stored dtypes and shards, and load with
``from_pretrained`` to a model that computes A's function. The routers compute in float32
whatever the model's dtype, so B (a permutation of A) agrees with A in float64 to float32
rounding of the routing weights: 1e-5 of the logits' scale; the output, equal to A, agrees to
float64 rounding. A conversion autoperm does not run (GTE's fused ``qkv_proj``, split by
``Chunk``) is refused with one message naming the stored tensors, and nothing is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")  # transformers 5: the conversion mapping

from autoperm import load_state_dict  # noqa: E402
from autoperm.errors import CheckpointError  # noqa: E402
from autoperm.io import find_layout  # noqa: E402
from autoperm.io.formats import safetensors_dtypes  # noqa: E402
from autoperm.pretrained import build_from_directory, read_model_directory, stored_names  # noqa: E402
from autoperm.spec import PermutationSpec  # noqa: E402
from tests.pretrained._directories import invoke, planted_pair  # noqa: E402

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96}


def _mixtral() -> nn.Module:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=48, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **SMALL))


def _qwen2_moe() -> nn.Module:
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, **SMALL))


def _deepseek_v3() -> nn.Module:
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4, **SMALL))


# builder, dtype saved, a stored per-expert tensor, the model tensor it is stacked into, its first row there
MODELS: dict[str, tuple[Callable[[], nn.Module], torch.dtype, str, str, int]] = {
    "mixtral": (_mixtral, torch.float32, "model.layers.1.block_sparse_moe.experts.3.w1.weight",
                "model.layers.1.mlp.experts.gate_up_proj", 0),
    "qwen2_moe": (_qwen2_moe, torch.bfloat16, "model.layers.1.mlp.experts.3.down_proj.weight",
                  "model.layers.1.mlp.experts.down_proj", 0),
    "deepseek_v3": (_deepseek_v3, torch.float32, "model.layers.0.mlp.experts.7.up_proj.weight",
                    "model.layers.0.mlp.experts.gate_up_proj", 24),  # the up half, after the gate half
}




def _random_weights_(model: nn.Module, seed: int) -> nn.Module:
    """Weights large enough that routing differs from token to token (DeepSeek's score bias too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and (tensor.ndim > 1 or name.endswith("e_score_correction_bias")):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
            elif tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """For each model: directories A and B (a planted permutation of A), and A's spec."""
    transformers.logging.set_verbosity_error()
    made = {}
    for name, (build, dtype, *_) in MODELS.items():
        torch.manual_seed(0)
        model = _random_weights_(build(), seed=1).to(dtype).eval()
        made[name] = planted_pair(model, tmp_path_factory.mktemp(name))
    return made


def _logits(directory: Path, name: str) -> torch.Tensor:
    """The float64 logits of the model ``from_pretrained`` loads from ``directory``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = type(MODELS[name][0]()).from_pretrained(directory).double().eval()
    model.config._experts_implementation = "eager"  # the loop over experts
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(tokens).logits


def _stored_dtypes(directory: Path) -> dict[str, torch.dtype]:
    layout = find_layout(directory)
    return {key: dtype for file, keys in layout.shards.items() for key, dtype in safetensors_dtypes(directory / file, keys).items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stored_experts_are_converted_by_transformers_operations_and_back(pairs, name: str) -> None:
    directory = read_model_directory(pairs[name]["a"])
    model = build_from_directory(directory)
    names = stored_names(directory.path, model)
    _, _, expert, stacked, row = MODELS[name]
    conversion = next(c for c in names.conversions if c.model == stacked)
    assert expert in conversion.stored and expert not in names.to_model and stacked in model.state_dict()
    assert set(names.to_model.values()) | {c.model for c in names.conversions} == set(model.state_dict())
    stored = load_state_dict(directory.path)
    assert set(names.to_model) | {key for c in names.conversions for key in c.stored} == set(stored)
    for each in names.conversions:
        tensor = each.to_model(stored)
        assert tensor.shape == model.state_dict()[each.model].shape and tensor.dtype == stored[each.stored[0]].dtype
        back = each.to_stored(tensor)
        assert back.keys() == set(each.stored)
        assert all(torch.equal(back[key], stored[key]) for key in each.stored), each.model
    number = int(expert.split(".experts.")[1].split(".")[0])  # the expert's place on the stacked axis
    block = names.model_state_dict(stored)[stacked][number].narrow(0, row, stored[expert].shape[0])
    assert torch.equal(block, stored[expert])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_match_moe_directories_recovers_and_writes_stored_experts(pairs, name: str, tmp_path: Path) -> None:
    paths = pairs[name]
    out = tmp_path / "b-aligned"
    result = invoke(["match", str(paths["a"]), str(paths["b"]), "-o", str(out), "--quiet"])
    assert result.exception is None, result.output
    layout = find_layout(out)
    assert layout.index is not None and layout.shards == find_layout(paths["b"]).shards  # stored names, shard by shard
    assert _stored_dtypes(out) == _stored_dtypes(paths["b"]) and set(_stored_dtypes(out).values()) == {MODELS[name][1]}
    sd_a, aligned, sd_b = load_state_dict(paths["a"]), load_state_dict(out), load_state_dict(paths["b"])
    assert MODELS[name][2] in aligned and aligned.keys() == sd_a.keys()
    assert all(torch.equal(aligned[key], sd_a[key]) for key in sd_a)  # exact recovery, expert by expert
    assert not torch.equal(sd_b[MODELS[name][2]], sd_a[MODELS[name][2]])  # B's experts really were permuted
    expected, permuted, loaded = _logits(paths["a"], name), _logits(paths["b"], name), _logits(out, name)
    scale = expected.abs().max().item()
    assert (loaded - expected).abs().max().item() <= 1e-12 * scale
    assert (permuted - expected).abs().max().item() <= 1e-5 * scale  # B computes A's function: the routers round


def test_match_leaves_tensors_it_does_not_permute_unchanged(pairs, tmp_path: Path) -> None:
    """With a spec of layer 0's experts alone, every other stored tensor, layer 1's experts included, is copied."""
    paths = pairs["qwen2_moe"]
    full = PermutationSpec.from_yaml(paths["spec"])
    block = "model.layers.0.mlp."
    groups = tuple(g for g in full.groups
                   if all(m.param.startswith(block) and "shared_expert" not in m.param for m in g.members))
    assert {m.param for g in groups for m in g.members} >= {block + "experts.gate_up_proj", block + "gate.weight"}
    spec = full.model_copy(update={"groups": groups, "affine_sites": None, "norm_folds": (), "kept_fixed": ()})
    spec_path = tmp_path / "experts.yaml"
    spec.to_yaml(spec_path)
    out = tmp_path / "b-aligned"
    result = invoke(["match", str(paths["a"]), str(paths["b"]), "-o", str(out), "--spec", str(spec_path), "--quiet"])
    assert result.exception is None, result.output
    aligned, sd_b = load_state_dict(out), load_state_dict(paths["b"])
    moved = [key for key in sd_b if ".layers.0.mlp." in key and "shared_expert" not in key]
    assert any(not torch.equal(aligned[key], sd_b[key]) for key in moved)  # layer 0's experts were permuted
    untouched = [key for key in sd_b if key not in moved]
    assert any(".layers.1.mlp.experts." in key for key in untouched)
    for key in untouched:
        assert aligned[key].dtype == sd_b[key].dtype and torch.equal(aligned[key].view(torch.uint8), sd_b[key].view(torch.uint8)), key


def test_merge_moe_directories_writes_stored_experts(pairs, tmp_path: Path) -> None:
    paths = pairs["mixtral"]
    out = tmp_path / "merged"
    result = invoke(["merge", str(paths["a"]), str(paths["b"]), "-o", str(out), "--spec", str(paths["spec"]), "--quiet"])
    assert result.exception is None, result.output
    sd_a, merged = load_state_dict(paths["a"]), load_state_dict(out)
    assert merged.keys() == sd_a.keys() and find_layout(out).shards == find_layout(paths["a"]).shards
    assert all(torch.allclose(merged[key], sd_a[key], atol=1e-6) for key in sd_a)  # the mean of A and aligned B is A
    expected = _logits(paths["a"], "mixtral")
    assert (_logits(out, "mixtral") - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_verify_loads_a_moe_directory_through_the_conversion(pairs) -> None:
    result = invoke(["verify", str(pairs["mixtral"]["b"]), "--spec", str(pairs["mixtral"]["spec"])])
    assert result.exception is None, result.output
    assert "OK: outputs unchanged" in result.output


def test_a_directory_of_another_number_of_experts_is_refused(pairs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.MixtralConfig.from_pretrained(pairs["mixtral"]["a"])
    config.num_local_experts = 2
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
    with pytest.raises(CheckpointError) as caught:
        stored_names(pairs["mixtral"]["a"], model)
    message = str(caught.value)
    assert str(pairs["mixtral"]["a"]) in message and "experts.gate_up_proj" in message and "experts.2.w1.weight" in message


def test_conversions_autoperm_does_not_run_are_refused(tmp_path: Path) -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GteModel(transformers.GteConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=64))
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    with pytest.raises(CheckpointError) as caught:
        stored_names(tmp_path / "a", model)
    message = str(caught.value)
    assert "encoder.layer.0.attention.qkv_proj.weight" in message and "Chunk" in message and str(tmp_path / "a") in message
    result = invoke(["match", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out"), "--quiet"])
    assert isinstance(result.exception, CheckpointError)
    assert "qkv_proj" in str(result.exception) and "not supported" in str(result.exception)
    assert not (tmp_path / "out").exists()
