"""Model directories as people have them: transformers and diffusers ``save_pretrained`` output.

Tiny models from the libraries' default configs (``use_cache=True`` included), shrunk, saved
sharded with a small ``max_shard_size``. B is a planted permutation of A saved the same way, so
``match A B`` must give back A exactly, in a directory that ``from_pretrained`` loads and that
computes B's function (compared in float64). No downloads.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from autoperm import apply_permutation, infer_spec, random_permutation  # noqa: E402
from autoperm.cli import cli  # noqa: E402
from autoperm.io import find_layout  # noqa: E402
from autoperm.spec import PermutationSpec  # noqa: E402
from tests.conftest import perturb_  # noqa: E402

SHARD = "40KB"


def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()


@dataclass(frozen=True)
class Arch:
    """How to build one tiny model, and inputs to compare functions on."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    loader: Callable[[str], nn.Module]


def _tokens() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))}


def _unet_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64),
        "timestep": torch.tensor([7.0], dtype=torch.float64),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=generator, dtype=torch.float64),
    }


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, attention_bias=True,
    ))


def _gpt2() -> nn.Module:  # tied embeddings by default
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32))


def _bert() -> nn.Module:  # masked-LM head tied to the word embeddings
    return transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=96,
        max_position_embeddings=32,
    ))


def _unet() -> nn.Module:
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, layers_per_block=1,
        sample_size=8, attention_head_dim=4, norm_num_groups=4,
    )


ARCHS: dict[str, Arch] = {
    "llama": Arch(_llama, _tokens, lambda p: transformers.LlamaForCausalLM.from_pretrained(p)),
    "gpt2": Arch(_gpt2, _tokens, lambda p: transformers.GPT2LMHeadModel.from_pretrained(p)),
    "bert": Arch(_bert, _tokens, lambda p: transformers.BertForMaskedLM.from_pretrained(p)),
    "unet": Arch(_unet, _unet_inputs, lambda p: diffusers.UNet2DConditionModel.from_pretrained(p)),
}




def _save(model: nn.Module, path: Path) -> None:
    model.save_pretrained(path, max_shard_size=SHARD)


class Directories:
    """For each architecture: A, B = planted permutation of A, and the spec, built once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[str, dict[str, Path]] = {}

    def get(self, name: str) -> dict[str, Path]:
        if name not in self.made:
            _quiet_transformers()
            torch.manual_seed(0)
            model = perturb_(ARCHS[name].build(), 1, scale=0.05).eval()
            base = self.root / name
            paths = {"a": base / "a", "b": base / "b", "spec": base / "spec.yaml"}
            _save(model, paths["a"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = CliRunner().invoke(cli, ["spec", str(paths["a"]), "-o", str(paths["spec"])], standalone_mode=False)
            assert result.exception is None, result.output
            spec = PermutationSpec.from_yaml(paths["spec"])
            assert spec.active_groups
            planted = apply_permutation(spec, random_permutation(spec, seed=5), model.state_dict())
            model.load_state_dict(planted)
            _save(model, paths["b"])
            self.made[name] = paths
        return self.made[name]


@pytest.fixture(scope="module")
def directories(tmp_path_factory: pytest.TempPathFactory) -> Directories:
    return Directories(tmp_path_factory.mktemp("pretrained"))


def _invoke(args: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(cli, args, standalone_mode=False, catch_exceptions=True)


def _outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = model.double().eval()
    with torch.no_grad():
        result = model(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}, return_dict=True)
    return result.logits if hasattr(result, "logits") else result.sample


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from autoperm import load_state_dict

    return load_state_dict(path)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_directory_is_sharded_and_spec_and_verify_run(directories: Directories, name: str) -> None:
    paths = directories.get(name)
    layout = find_layout(paths["a"])
    assert layout.index is not None and len(layout.shards) > 1  # really sharded
    result = _invoke(["verify", str(paths["a"]), "--spec", str(paths["spec"])])
    assert result.exception is None, result.output
    assert "OK: outputs unchanged" in result.output
    spec = PermutationSpec.from_yaml(paths["spec"])
    assert spec.model.split(":")[0] in ("transformers", "diffusers")


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_match_directories_recovers_planted_permutation(directories: Directories, name: str, tmp_path: Path) -> None:
    paths = directories.get(name)
    out = tmp_path / "b-aligned"
    before = {p.name: p.read_bytes() for p in paths["b"].iterdir()}
    result = _invoke(["match", str(paths["a"]), str(paths["b"]), "-o", str(out), "--quiet"])
    assert result.exception is None, result.output
    assert {p.name: p.read_bytes() for p in paths["b"].iterdir()} == before  # input untouched
    # same layout: same files, same tensors in each shard, same non-weight files
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert find_layout(out).shards == find_layout(paths["b"]).shards
    assert (out / "config.json").read_text() == (paths["b"] / "config.json").read_text()
    # exact recovery: the aligned B is A, tensor for tensor
    sd_a, aligned = _weights(paths["a"]), _weights(out)
    assert aligned.keys() == sd_a.keys()
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)
    # it loads with from_pretrained and computes B's function (float64; LLaMA's RMSNorm and RoPE
    # compute in float32 whatever the model's dtype, so a permuted stream reorders float32 sums)
    loaded, original = ARCHS[name].loader(str(out)), ARCHS[name].loader(str(paths["b"]))
    inputs = ARCHS[name].inputs()
    expected = _outputs(original, inputs)
    tolerance = (1e-6 if name == "llama" else 1e-10) * expected.abs().max().item()
    assert (_outputs(loaded, inputs) - expected).abs().max().item() <= tolerance


def test_tied_weights_stay_tied_and_are_stored_once(directories: Directories, tmp_path: Path) -> None:
    paths = directories.get("gpt2")
    out = tmp_path / "aligned"
    assert _invoke(["match", str(paths["a"]), str(paths["b"]), "-o", str(out), "--quiet"]).exception is None
    stored = _weights(out)
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, _weights(paths["a"])["transformer.wte.weight"])


@pytest.mark.parametrize("name", ["llama", "unet"])
def test_merge_directories_of_permuted_copies_is_the_model(directories: Directories, name: str, tmp_path: Path) -> None:
    paths = directories.get(name)
    out = tmp_path / "merged"
    result = _invoke(["merge", str(paths["a"]), str(paths["b"]), str(paths["b"]), "-o", str(out),
                      "--spec", str(paths["spec"]), "--quiet"])
    assert result.exception is None, result.output
    sd_a, merged = _weights(paths["a"]), _weights(out)
    assert merged.keys() == sd_a.keys()
    assert all(torch.allclose(merged[k].double(), sd_a[k].double(), atol=1e-6) for k in sd_a)
    model = ARCHS[name].loader(str(out))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads((out / find_layout(out).index).read_text())["weight_map"] == json.loads(
        (paths["a"] / find_layout(paths["a"]).index).read_text()
    )["weight_map"]


def test_outputs_follow_the_umask(directories: Directories, tmp_path: Path) -> None:
    paths = directories.get("llama")
    out = tmp_path / "aligned"
    assert _invoke(["match", str(paths["a"]), str(paths["b"]), "-o", str(out), "--quiet",
                    "--spec", str(paths["spec"])]).exception is None
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    for file in out.iterdir():
        assert (file.stat().st_mode & 0o777) == 0o666 & ~mask, file.name


def test_default_configs_trace_with_caching_and_switch_it_back() -> None:
    _quiet_transformers()
    for model in (_llama(), _gpt2()):
        assert model.config.use_cache is True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = infer_spec(model, _tokens())
        assert spec.active_groups
        assert model.config.use_cache is True
