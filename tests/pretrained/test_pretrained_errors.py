"""Bad model directories and checkpoints: one clear message each, exit code 1, nothing written."""

from __future__ import annotations

import collections
import fractions
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from autoperm import CheckpointError, load_state_dict
from autoperm.cli import cli

transformers = pytest.importorskip("transformers")


def _invoke(args: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(cli, args, standalone_mode=False, catch_exceptions=True)


def _tiny(cls, config, path: Path) -> Path:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cls(config).save_pretrained(path, max_shard_size="30KB")
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    return _tiny(transformers.LlamaForCausalLM, config, tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    return _tiny(transformers.GPT2LMHeadModel, config, tmp_path_factory.mktemp("gpt2") / "model")


def _copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _error(result) -> str:
    assert isinstance(result.exception, Exception), result.output
    return str(result.exception)


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary left


def test_directory_without_config(tmp_path: Path, llama: Path) -> None:
    bare = _copy(llama, tmp_path / "bare")
    (bare / "config.json").unlink()
    message = _error(_invoke(["spec", str(bare)]))
    assert "has no config.json" in message and "bare" in message
    message = _error(_invoke(["match", str(bare), str(llama), "-o", str(tmp_path / "out")]))
    assert "not a model directory with config.json" in message
    _nothing_written(tmp_path, tmp_path / "out")


def test_config_naming_a_class_that_is_not_installed(tmp_path: Path, llama: Path) -> None:
    odd = _copy(llama, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    message = _error(_invoke(["match", str(odd), str(llama), "-o", str(tmp_path / "out")]))
    assert "'architectures'" in message and "NoSuchModelForCausalLM" in message and "does not provide" in message
    _nothing_written(tmp_path, tmp_path / "out")


def test_shard_missing_from_the_index(tmp_path: Path, llama: Path) -> None:
    broken = _copy(llama, tmp_path / "broken")
    shards = sorted(broken.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    message = _error(_invoke(["match", str(llama), str(broken), "-o", str(tmp_path / "out")]))
    assert "model.safetensors.index.json" in message and shards[1].name in message and "not in the directory" in message
    _nothing_written(tmp_path, tmp_path / "out")


def test_mismatched_architectures(tmp_path: Path, llama: Path, gpt2: Path) -> None:
    message = _error(_invoke(["match", str(llama), str(gpt2), "-o", str(tmp_path / "out"), "--quiet"]))
    assert "different architectures" in message and str(gpt2) in message and "GPT2LMHeadModel" in message
    _nothing_written(tmp_path, tmp_path / "out")
    message = _error(_invoke(["merge", str(llama), str(llama), str(gpt2), "-o", str(tmp_path / "out"), "--quiet"]))
    assert str(gpt2) in message
    _nothing_written(tmp_path, tmp_path / "out")


def test_output_existing_or_inside_an_input_is_refused(tmp_path: Path, llama: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    message = _error(_invoke(["match", str(llama), str(llama), "-o", str(existing)]))
    assert "already exists" in message
    message = _error(_invoke(["match", str(llama), str(llama), "-o", str(llama / "inside")]))
    assert "inside the input directory" in message
    assert not (llama / "inside").exists()


def test_cli_exit_code_and_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, "-m", "autoperm", "spec", str(tmp_path / "empty")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and "has no config.json" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_unsafe_and_corrupt_torch_files_say_so_briefly(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"weight": torch.zeros(2), "step": fractions.Fraction(1, 2)}, unsafe)
    with pytest.raises(CheckpointError) as caught:
        load_state_dict(unsafe)
    message = str(caught.value)
    assert "fractions.Fraction" in message and "unsafe.pt" in message
    assert "weights_only=False" not in message and len(message) < 300 and "\n" not in message
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    with pytest.raises(CheckpointError) as caught:
        load_state_dict(corrupt)
    message = str(caught.value)
    assert "corrupt.pt" in message and "weights_only" not in message and len(message) < 300
    torch.save(collections.OrderedDict(w=torch.ones(3)), tmp_path / "fine.pt")
    assert torch.equal(load_state_dict(tmp_path / "fine.pt")["w"], torch.ones(3))


def test_legacy_bin_shards_are_read_with_weights_only(tmp_path: Path) -> None:
    directory = tmp_path / "legacy"
    directory.mkdir()
    torch.save({"a.weight": torch.ones(2, 2)}, directory / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": torch.zeros(3)}, directory / "pytorch_model-00002-of-00002.bin")
    index = {"metadata": {"total_size": 28}, "weight_map": {
        "a.weight": "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin"}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    loaded = load_state_dict(directory)
    assert torch.equal(loaded["a.weight"], torch.ones(2, 2)) and torch.equal(loaded["b.weight"], torch.zeros(3))


def _cli_run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoperm", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def test_b_without_config_is_refused(tmp_path: Path, llama: Path) -> None:
    bare = _copy(llama, tmp_path / "bare")
    (bare / "config.json").unlink()
    line = _one_error_line(_cli_run(["match", str(llama), str(bare), "-o", str(tmp_path / "out"), "--quiet"]))
    assert "has no config.json" in line and str(bare) in line
    _nothing_written(tmp_path, tmp_path / "out")


def test_b_with_corrupt_config_is_refused(tmp_path: Path, llama: Path) -> None:
    corrupt = _copy(llama, tmp_path / "corrupt")
    (corrupt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 3')
    line = _one_error_line(_cli_run(["match", str(llama), str(corrupt), "-o", str(tmp_path / "out"), "--quiet"]))
    assert "cannot read" in line and str(corrupt / "config.json") in line
    _nothing_written(tmp_path, tmp_path / "out")
    message = _error(_invoke(["merge", str(llama), str(corrupt), "-o", str(tmp_path / "out"), "--quiet"]))
    assert str(corrupt / "config.json") in message
    _nothing_written(tmp_path, tmp_path / "out")


def test_configs_differing_where_shapes_agree_need_the_flag(tmp_path: Path, llama: Path) -> None:
    other = _copy(llama, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config.update(rms_norm_eps=1e-3, hidden_act="gelu", transformers_version="0.0.1")  # the version is bookkeeping
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = _one_error_line(_cli_run(["match", str(llama), str(other), "-o", str(out), "--quiet"]))
    assert "2 field(s)" in line and "hidden_act" in line and "rms_norm_eps" in line and "transformers_version" not in line
    assert "--allow-config-mismatch" in line
    _nothing_written(tmp_path, out)
    result = _invoke(["match", str(llama), str(other), "-o", str(out), "--quiet", "--allow-config-mismatch"])
    assert result.exception is None, result.output
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu"  # B's files are kept


def test_truncated_shard_is_refused(tmp_path: Path, llama: Path) -> None:
    truncated = _copy(llama, tmp_path / "truncated")
    shard = sorted(truncated.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    line = _one_error_line(_cli_run(["match", str(llama), str(truncated), "-o", str(tmp_path / "out"), "--quiet"]))
    assert shard.name in line
    _nothing_written(tmp_path, tmp_path / "out")


def test_output_inside_an_input_is_refused_in_one_line(tmp_path: Path, llama: Path) -> None:
    line = _one_error_line(_cli_run(["match", str(llama), str(llama), "-o", str(llama / "aligned"), "--quiet"]))
    assert "inside the input directory" in line
    assert not (llama / "aligned").exists()


def test_different_architectures_in_one_line(tmp_path: Path, llama: Path, gpt2: Path) -> None:
    line = _one_error_line(_cli_run(["match", str(llama), str(gpt2), "-o", str(tmp_path / "out"), "--quiet"]))
    assert "different architectures" in line and "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line
    _nothing_written(tmp_path, tmp_path / "out")
