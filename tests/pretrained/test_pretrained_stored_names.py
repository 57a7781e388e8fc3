"""Directories whose stored tensor names differ from the class's (transformers 5 renames them when loading).

GPT-NeoX stores ``embed_out`` for the class's ``lm_head``; ViT stores
``encoder.layer.N.attention.attention.query`` for ``layers.N.attention.q_proj``. Tiny models are
built from configs and saved locally; B is a planted permutation of A. ``match A B`` must give
back A exactly, written under the stored names, loadable with ``from_pretrained`` and computing
B's function (float64). Tensors transformers stacks when loading (mixture-of-experts weights)
are tested in ``test_moe_directories.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from autoperm import load_state_dict  # noqa: E402
from autoperm.io import find_layout  # noqa: E402
from autoperm.pretrained import build_from_directory, read_model_directory, stored_names  # noqa: E402
from tests.pretrained._directories import invoke, planted_pair  # noqa: E402
from tests.conftest import perturb_  # noqa: E402


def _gpt_neox() -> nn.Module:
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=96,
        max_position_embeddings=32,
    ))


def _vit() -> nn.Module:
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=8,
    ))


def _tokens() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))}


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))}


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]], str]] = {
    "gpt_neox": (_gpt_neox, _tokens, "embed_out.weight"),
    "vit": (_vit, _pixels, "encoder.layer.0.attention.attention.query.weight"),
}






@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """For each model: directories A and B (a planted permutation of A) and A's spec."""
    transformers.logging.set_verbosity_error()
    made = {}
    for name, (build, _, _) in MODELS.items():
        torch.manual_seed(0)
        model = perturb_(build(), 1, scale=0.05).eval()
        made[name] = planted_pair(model, tmp_path_factory.mktemp(name))
    return made


def _outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = model.double().eval()
    with torch.no_grad():
        result = model(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}, return_dict=True)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stored_names_follow_transformers_conversion_mapping(pairs, name: str) -> None:
    directory = read_model_directory(pairs[name]["a"])
    model = build_from_directory(directory)
    names = stored_names(directory.path, model)
    stored = MODELS[name][2]
    assert stored in names.to_model and stored not in model.state_dict()  # really renamed
    assert names.to_model[stored] in model.state_dict()
    assert set(names.to_model.values()) <= set(model.state_dict())
    assert names.to_stored[names.to_model[stored]] == stored


@pytest.mark.parametrize("name", sorted(MODELS))
def test_match_renamed_directories_recovers_and_writes_stored_names(pairs, name: str, tmp_path: Path) -> None:
    paths = pairs[name]
    out = tmp_path / "b-aligned"
    result = invoke(["match", str(paths["a"]), str(paths["b"]), "-o", str(out), "--quiet"])
    assert result.exception is None, result.output
    assert find_layout(out).shards == find_layout(paths["b"]).shards  # the stored names, shard by shard
    sd_a, aligned, sd_b = load_state_dict(paths["a"]), load_state_dict(out), load_state_dict(paths["b"])
    assert aligned.keys() == sd_a.keys() and MODELS[name][2] in aligned
    assert all(torch.equal(aligned[key], sd_a[key]) for key in sd_a)  # exact recovery
    assert any(not torch.equal(sd_b[key], sd_a[key]) for key in sd_a)  # B really was permuted
    cls = type(MODELS[name][0]())
    loaded, original = cls.from_pretrained(out), cls.from_pretrained(paths["b"])
    inputs = MODELS[name][1]()
    expected = _outputs(original, inputs)
    assert (_outputs(loaded, inputs) - expected).abs().max().item() <= 1e-10 * expected.abs().max().item()


def test_merge_renamed_directories_writes_stored_names(pairs, tmp_path: Path) -> None:
    paths = pairs["gpt_neox"]
    out = tmp_path / "merged"
    result = invoke(["merge", str(paths["a"]), str(paths["b"]), "-o", str(out), "--spec", str(paths["spec"]), "--quiet"])
    assert result.exception is None, result.output
    sd_a, merged = load_state_dict(paths["a"]), load_state_dict(out)
    assert merged.keys() == sd_a.keys()
    assert all(torch.allclose(merged[key], sd_a[key], atol=1e-6) for key in sd_a)
    assert transformers.GPTNeoXForCausalLM.from_pretrained(out).lm_head.weight.shape == sd_a["embed_out.weight"].shape


def test_verify_runs_a_renamed_directory_with_its_own_weights(pairs) -> None:
    result = invoke(["verify", str(pairs["gpt_neox"]["a"]), "--spec", str(pairs["gpt_neox"]["spec"])])
    assert result.exception is None, result.output
    assert "OK: outputs unchanged" in result.output
