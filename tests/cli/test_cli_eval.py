"""`autoperm barrier`, `autoperm analyze` and `autoperm demo` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from autoperm.cli import cli
from autoperm.models import MLP

MODEL = "autoperm.models:MLP"
KWARGS = ["--kwargs", "in_features=64", "--kwargs", "hidden=32", "--kwargs", "depth=2"]


@pytest.fixture
def checkpoints(tmp_path):
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(MLP(64, hidden=32, depth=2).state_dict(), paths[name])
    torch.manual_seed(2)
    paths["wrong"] = tmp_path / "wrong.pt"
    torch.save(MLP(64, hidden=16, depth=2).state_dict(), paths["wrong"])
    return paths


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_barrier_prints_table_and_writes_json_and_plot(checkpoints, tmp_path):
    report, plot = tmp_path / "r.json", tmp_path / "c.png"
    result = invoke("barrier", MODEL, *KWARGS, "--a", str(checkpoints["a"]), "--b", str(checkpoints["b"]),
                    "--data", "digits", "--points", "3", "--reset-bn", "--json", str(report), "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert "test_loss" in result.output and "mean barrier" in result.output
    data = json.loads(report.read_text())
    assert data["curve"]["t"] == [0.0, 0.5, 1.0]
    assert set(data["barriers"]) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_analyze_reports_distance_and_alignment(checkpoints, tmp_path):
    report = tmp_path / "a.json"
    result = invoke("analyze", MODEL, *KWARGS, "--a", str(checkpoints["a"]), "--b", str(checkpoints["b"]),
                    "--b-aligned", str(checkpoints["a"]), "--gamma", "0.3", "--json", str(report))
    assert result.exit_code == 0, result.output
    assert "L2 distance reduced by 100.0%" in result.output
    data = json.loads(report.read_text())
    assert data["B_aligned"]["singular"]["alignment"] == pytest.approx(1.0)
    assert abs(data["B"]["singular"]["alignment"]) < 0.3
    assert "invariance check skipped" in result.output


def test_analyze_infers_the_spec_for_the_invariance_check(checkpoints):
    result = invoke("analyze", MODEL, *KWARGS, "--a", str(checkpoints["a"]), "--b", str(checkpoints["b"]),
                    "--input-shape", "1,64")
    assert result.exit_code == 0, result.output
    assert "largest singular-value change under a random permutation" in result.output


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = "from autoperm.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "nosuchdata"], "built-in name"),
        (["--data", "no_such_module_q:f"], "cannot import"),
    ],
)
def test_barrier_bad_data_is_one_clear_error(checkpoints, extra, message):
    result = run_cli("barrier", MODEL, *KWARGS, "--a", str(checkpoints["a"]), "--b", str(checkpoints["b"]), *extra)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_that_does_not_fit_is_one_clear_error(checkpoints):
    result = run_cli("analyze", MODEL, *KWARGS, "--a", str(checkpoints["a"]), "--b", str(checkpoints["wrong"]))
    assert result.returncode == 1
    assert "does not fit the model" in result.stderr and "Traceback" not in result.stderr
    missing = run_cli("analyze", MODEL, *KWARGS, "--a", str(checkpoints["a"]), "--b", "/nonexistent/b.pt")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_usage_errors_exit_with_2():
    result = invoke("barrier", MODEL, "--a", "x.pt")
    assert result.exit_code == 2 and "Missing option" in result.output
    assert invoke("analyze", MODEL, "--a", "a", "--b", "b", "--gamma", "1.5").exit_code == 2


def test_demo_help_lists_options():
    result = invoke("demo", "--help")
    assert result.exit_code == 0 and "--quick" in result.output and "--out" in result.output
