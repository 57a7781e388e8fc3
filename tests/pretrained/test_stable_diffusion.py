"""Stable Diffusion as kept: LDM single files and pipeline folders through `autoperm match`.

Tiny UNets in the SD 1.x, SD 2.x and SDXL block layouts are made locally, written as LDM single
files (with VAE and text-encoder tensors) and as pipeline folders, B being A with a planted
permutation; the CLI must recover A exactly, keep B's layout, dtypes and other components
bitwise, and write something diffusers loads. Bad inputs get one `error:` line, exit code 1 and
no output.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.pretrained._stable_diffusion import (
    CONFIGS,
    OTHER_COMPONENTS,
    diffusers,
    ldm_name,
    ldm_state_dict,
    tiny_unet,
    unet_inputs,
    write_ldm_file,
    write_pipeline,
)
from autoperm import apply_permutation, infer_spec, random_permutation
from autoperm.cli import cli
from autoperm.cli.common import run_cli
from autoperm.io.single_file import read_single_file
from autoperm.pretrained.stable_diffusion import read_ldm_unet


def _planted(family: str) -> tuple["diffusers.UNet2DConditionModel", dict, dict]:
    """The tiny UNet, its state dict A, and B = A with a planted permutation (diffusers names)."""
    model = tiny_unet(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, unet_inputs(family))
    sd_a = model.state_dict()
    return model, sd_a, apply_permutation(spec, random_permutation(spec, seed=1), sd_a)


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["autoperm", *args])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_cli(cli)
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary left


def _one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_names_come_from_diffusers_conversion_and_keep_the_function(family: str) -> None:
    model = tiny_unet(family)
    sd = model.state_dict()
    tensors = ldm_state_dict(family, sd, torch.float32)
    unet = read_ldm_unet(tensors, f"tiny-{family}.safetensors")
    assert unet.family == family
    assert unet.names == {ldm_name(k, sd, CONFIGS[family]["layers_per_block"]): k for k in sd}
    assert unet.config["use_linear_projection"] == (family != "SD 1.x")  # proj_in linear vs 1x1 conv: no reshape
    rebuilt = unet.build("cpu")
    rebuilt.load_state_dict(unet.rename(tensors), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(**unet_inputs(family)).sample, model(**unet_inputs(family)).sample)


@pytest.mark.parametrize(("family", "suffix", "dtype"), [
    ("SD 1.x", ".safetensors", torch.float16),
    ("SD 2.x", ".ckpt", torch.float32),
    ("SDXL", ".safetensors", torch.bfloat16),
])
def test_single_file_match_recovers_the_planted_permutation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, family: str, suffix: str,
    dtype: torch.dtype,
) -> None:
    model, sd_a, sd_b = _planted(family)
    file_a = write_ldm_file(tmp_path / f"a{suffix}", ldm_state_dict(family, sd_a, dtype))
    tensors_b = ldm_state_dict(family, sd_b, dtype)
    tensors_b.update({name: -value for name, value in tensors_b.items() if name in OTHER_COMPONENTS[family]})
    file_b = write_ldm_file(tmp_path / f"b{suffix}", tensors_b)
    out = tmp_path / f"aligned{suffix}"
    code, stdout, err = _run(monkeypatch, capsys, "match", str(file_a), str(file_b), "-o", str(out))
    assert code == 0, err
    assert f"{family} UNet aligned" in stdout and "copied unchanged" in stdout and "VAE" in stdout
    layout_a, aligned_a = read_single_file(file_a)
    layout_b, _ = read_single_file(file_b)
    layout, aligned = read_single_file(out)
    assert layout.keys == layout_b.keys and layout.dtypes == layout_b.dtypes and layout.metadata == layout_b.metadata
    assert layout.outer == layout_b.outer
    for name, tensor in aligned.items():  # the UNet is A again, bitwise; the rest is B's, bitwise
        expected = tensors_b[name] if name in OTHER_COMPONENTS[family] else aligned_a[name]
        assert tensor.dtype == dtype and torch.equal(tensor, expected), name
    unet = read_ldm_unet(aligned, out)
    rebuilt = unet.build("cpu")
    rebuilt.load_state_dict(unet.rename(aligned), strict=True)  # the output loads in diffusers' model


def test_pipeline_match_aligns_the_unet_and_copies_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    model, sd_a, sd_b = _planted("SD 1.x")
    pipeline_a = write_pipeline(tmp_path / "a", model, torch.float16)
    model.load_state_dict(sd_b)
    pipeline_b = write_pipeline(tmp_path / "b", model, torch.float16)
    out = tmp_path / "aligned"
    code, stdout, err = _run(monkeypatch, capsys, "match", str(pipeline_a), str(pipeline_b), "-o", str(out), "--quiet")
    assert code == 0 and stdout == "", err
    loaded = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")  # loads in diffusers
    for shard in (out / "unet").glob("*.safetensors"):
        assert set(read_single_file(shard)[0].dtypes.values()) == {torch.float16}
    reference = diffusers.UNet2DConditionModel.from_pretrained(pipeline_a / "unet")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert sorted(p.name for p in (out / "unet").iterdir()) == sorted(p.name for p in (pipeline_b / "unet").iterdir())
    for path in pipeline_b.rglob("*"):
        if path.is_file() and "unet" not in path.parts[len(pipeline_b.parts):]:
            assert (out / path.relative_to(pipeline_b)).read_bytes() == path.read_bytes(), path


@pytest.fixture()
def sd1_files(tmp_path: Path) -> dict[str, Path]:
    model, sd_a, sd_b = _planted("SD 1.x")
    files = {
        "a": write_ldm_file(tmp_path / "a.safetensors", ldm_state_dict("SD 1.x", sd_a, torch.float16)),
        "b": write_ldm_file(tmp_path / "b.safetensors", ldm_state_dict("SD 1.x", sd_b, torch.float16)),
        "xl": write_ldm_file(tmp_path / "xl.safetensors", ldm_state_dict("SDXL", tiny_unet("SDXL").state_dict(), torch.float16)),
    }
    write_pipeline(tmp_path / "pipe-a", model, torch.float16)
    write_pipeline(tmp_path / "pipe-b", model, torch.float16)
    return files


def test_bad_inputs_get_one_line_and_write_nothing(
    tmp_path: Path, sd1_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    from safetensors.torch import save_file

    out = tmp_path / "out.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    line = _one_error_line(*_run(monkeypatch, capsys, "match", str(tmp_path / "plain.safetensors"),
                                 str(sd1_files["b"]), "-o", str(out))[::2])
    assert "single file of an unknown layout" in line and "plain.safetensors" in line
    _nothing_written(out)

    line = _one_error_line(*_run(monkeypatch, capsys, "match", str(sd1_files["a"]), str(sd1_files["xl"]), "-o", str(out))[::2])
    assert "SD 1.x" in line and "SDXL" in line and "xl.safetensors" in line
    _nothing_written(out)

    line = _one_error_line(*_run(monkeypatch, capsys, "merge", str(sd1_files["a"]), str(sd1_files["b"]), "-o", str(out))[::2])
    assert "merge does not take Stable Diffusion" in line and "autoperm match" in line
    _nothing_written(out)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd1_files["b"].read_bytes()[:-1000])
    line = _one_error_line(*_run(monkeypatch, capsys, "match", str(sd1_files["a"]), str(truncated), "-o", str(out))[::2])
    assert "truncated" in line and "truncated.safetensors" in line
    _nothing_written(out)


def test_bad_pipelines_get_one_line_and_write_nothing(
    tmp_path: Path, sd1_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    pipe_a, pipe_b, out = tmp_path / "pipe-a", tmp_path / "pipe-b", tmp_path / "out"
    index = json.loads((pipe_b / "model_index.json").read_text())
    without = tmp_path / "no-unet"
    without.mkdir()
    (without / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "unet"}))
    line = _one_error_line(*_run(monkeypatch, capsys, "match", str(pipe_a), str(without), "-o", str(out))[::2])
    assert "has no UNet" in line and "no-unet" in line
    _nothing_written(out)

    shard = sorted((pipe_b / "unet").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = _one_error_line(*_run(monkeypatch, capsys, "match", str(pipe_a), str(pipe_b), "-o", str(out))[::2])
    assert shard.name in line
    _nothing_written(out)

    inside = pipe_a / "aligned"
    line = _one_error_line(*_run(monkeypatch, capsys, "match", str(pipe_a), str(pipe_a), "-o", str(inside))[::2])
    assert "inside" in line
    _nothing_written(inside)
