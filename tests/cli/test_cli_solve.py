"""`autoperm match` / `autoperm merge`: round trips and one clear message per bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from autoperm import AutopermError, apply_permutation, load_state_dict, random_permutation, save_state_dict
from autoperm.cli import cli
from autoperm.cli.solve_cmds import load_perms
from tests._specs import MLP, mlp_spec

MODEL = ["autoperm.models:MLP", "--kwargs", "in_features=16", "--kwargs", "hidden=8", "--kwargs", "num_classes=4",
         "--input-shape", "2,16"]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = MLP(in_features=16, hidden=8, num_classes=4)
    spec = mlp_spec(model)
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, random_permutation(spec, seed=1), sd_a)
    paths = {"a": tmp_path / "a.pt", "b": tmp_path / "b.safetensors", "spec": tmp_path / "spec.yaml"}
    save_state_dict(sd_a, paths["a"])
    save_state_dict(sd_b, paths["b"])
    spec.to_yaml(paths["spec"])
    paths["dir"] = tmp_path
    return paths


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, args, standalone_mode=False, catch_exceptions=True)


def test_match_writes_b_aligned_to_a_and_the_permutations(files) -> None:
    out, perms = files["dir"] / "aligned.pt", files["dir"] / "perms.yaml"
    result = _invoke(["match", *MODEL, "--a", str(files["a"]), "--b", str(files["b"]), "--spec", str(files["spec"]),
                      "-o", str(out), "--perms-out", str(perms), "--quiet"])
    assert result.exception is None, result.output
    sd_a, aligned = load_state_dict(files["a"]), load_state_dict(out)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)
    spec = mlp_spec(MLP(16, 8, num_classes=4))
    from_file = apply_permutation(spec, load_perms(str(perms)), load_state_dict(files["b"]))
    assert all(torch.equal(from_file[k], sd_a[k]) for k in sd_a)
    assert result.output == ""


def test_merge_of_permuted_copies_is_the_model(files) -> None:
    out = files["dir"] / "merged.safetensors"
    result = _invoke(["merge", *MODEL, str(files["a"]), str(files["b"]), str(files["b"]), "--spec", str(files["spec"]),
                      "-o", str(out)])
    assert result.exception is None, result.output
    assert "merged 3 models" in result.output
    sd_a, merged = load_state_dict(files["a"]), load_state_dict(out)
    assert all(torch.allclose(merged[k], sd_a[k], atol=1e-7) for k in sd_a)


def test_output_over_an_input_is_refused_before_any_work(files) -> None:
    before = files["b"].read_bytes()
    result = _invoke(["match", *MODEL, "--a", str(files["a"]), "--b", str(files["b"]), "--spec", str(files["spec"]),
                      "-o", str(files["b"])])
    assert isinstance(result.exception, AutopermError)
    assert "refusing to overwrite input file" in str(result.exception) and "b.safetensors" in str(result.exception)
    assert files["b"].read_bytes() == before


def test_mismatched_checkpoint_names_the_file_and_key(files) -> None:
    other = files["dir"] / "other.pt"
    save_state_dict(MLP(16, 9, num_classes=4).state_dict(), other)
    result = _invoke(["match", *MODEL, "--a", str(files["a"]), "--b", str(other), "--spec", str(files["spec"]),
                      "-o", str(files["dir"] / "x.pt")])
    message = str(result.exception)
    assert isinstance(result.exception, AutopermError)
    assert "other.pt" in message and "'layers.0.weight' has shape [9, 16], expected [8, 16]" in message
    assert not (files["dir"] / "x.pt").exists()


def test_missing_checkpoint_and_missing_data_are_named(files) -> None:
    result = _invoke(["match", *MODEL, "--a", str(files["a"]), "--b", str(files["dir"] / "nope.pt"),
                      "--spec", str(files["spec"]), "-o", str(files["dir"] / "x.pt")])
    assert "nope.pt" in str(result.exception) and "does not exist" in str(result.exception)
    result = _invoke(["match", *MODEL, "--a", str(files["a"]), "--b", str(files["b"]), "--method", "ste",
                      "--spec", str(files["spec"]), "-o", str(files["dir"] / "x.pt")])
    assert "--method ste needs --data" in str(result.exception)


def test_ste_and_act_run_with_builtin_digits_data(files, tmp_path: Path) -> None:
    model = ["autoperm.models:MLP", "--kwargs", "in_features=64", "--kwargs", "hidden=8", "--input-shape", "2,64"]
    reference = MLP(64, 8)
    spec = mlp_spec(reference)
    spec.to_yaml(tmp_path / "digits.yaml")
    save_state_dict(reference.state_dict(), tmp_path / "a.pt")
    save_state_dict(MLP(64, 8).state_dict(), tmp_path / "b.pt")
    for method in ("ste", "act"):
        out = tmp_path / f"{method}.pt"
        result = _invoke(["match", *model, "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"),
                          "--spec", str(tmp_path / "digits.yaml"), "--method", method, "--data", "digits",
                          "--epochs", "1", "-o", str(out)])
        assert result.exception is None, (method, result.exception)
        assert out.exists() and f"{method}: objective" in result.output


def test_console_entry_point_exits_non_zero_with_one_message(files) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", "from autoperm.cli import main; main()", "match", *MODEL, "--a", str(files["a"]),
         "--b", str(files["dir"] / "missing.pt"), "--spec", str(files["spec"]), "-o", str(files["dir"] / "x.pt")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().startswith("error: checkpoint") and "missing.pt" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_match_shows_bars_of_sweeps_and_of_the_groups_within_them(files) -> None:
    out = files["dir"] / "aligned.pt"
    result = _invoke(["match", *MODEL, "--a", str(files["a"]), "--b", str(files["b"]), "--spec", str(files["spec"]),
                      "-o", str(out)])
    assert result.exception is None, result.output
    assert "sweeps" in result.output and "groups" in result.output
    assert "wm: objective" in result.output
