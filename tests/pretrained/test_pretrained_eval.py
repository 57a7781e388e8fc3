"""`barrier`, `analyze` and `verify` on Hugging Face directories.

A tiny LLaMA saved locally (A), B a planted permutation of A, and B aligned by ``match``:
the path from A to aligned B is flat (they are the same weights), B computes A's function, and
aligned B is at distance 0 from A. ``verify`` falls back to float32 when float64 copies of the
weights would not fit in the memory available, and says so.
"""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from autoperm import apply_permutation, random_permutation  # noqa: E402
from autoperm.cli import cli  # noqa: E402
from autoperm.cli import spec_cmds  # noqa: E402
from autoperm.spec import PermutationSpec  # noqa: E402

VOCABULARY = 96


def _invoke(args: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(cli, args, standalone_mode=False, catch_exceptions=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories A, B (planted permutation of A), B aligned to A, the spec, and a data module."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCABULARY,
    ))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape))
    root = tmp_path_factory.mktemp("llama_eval")
    paths = {"a": root / "a", "b": root / "b", "aligned": root / "aligned", "spec": root / "spec.yaml", "data": root / "data"}
    model.save_pretrained(paths["a"], max_shard_size="40KB")
    assert _invoke(["spec", str(paths["a"]), "-o", str(paths["spec"])]).exception is None
    spec = PermutationSpec.from_yaml(paths["spec"])
    model.load_state_dict(apply_permutation(spec, random_permutation(spec, seed=5), model.state_dict()))
    model.save_pretrained(paths["b"], max_shard_size="40KB")
    result = _invoke(["match", str(paths["a"]), str(paths["b"]), "-o", str(paths["aligned"]), "--quiet"])
    assert result.exception is None, result.output
    paths["data"].mkdir()
    (paths["data"] / "llama_eval_tokens.py").write_text(textwrap.dedent(f"""
        import torch

        def tokens():
            ids = torch.randint(0, {VOCABULARY}, (8, 12), generator=torch.Generator().manual_seed(1))
            return {{"test": (ids[:, :-1], ids[:, 1:])}}
    """))
    return paths


def test_barrier_takes_directories(llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(llama["data"]))
    curves = {}
    for label in ("b", "aligned"):
        report = tmp_path / f"{label}.json"
        result = _invoke(["barrier", str(llama["a"]), "--a", str(llama["a"]), "--b", str(llama[label]),
                          "--data", "llama_eval_tokens:tokens", "--points", "3", "--json", str(report)])
        assert result.exception is None, result.output
        curves[label] = json.loads(report.read_text())["curve"]["test_loss"]
    loss_a = curves["aligned"][0]
    assert loss_a > 0 and all(abs(loss - loss_a) <= 1e-5 * loss_a for loss in curves["aligned"])  # A to A: flat
    assert abs(curves["b"][-1] - loss_a) <= 1e-4 * loss_a  # B computes A's function


def test_analyze_takes_directories(llama: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "analysis.json"
    result = _invoke(["analyze", str(llama["a"]), "--a", str(llama["a"]), "--b", str(llama["b"]),
                      "--b-aligned", str(llama["aligned"]), "--spec", str(llama["spec"]), "--json", str(report)])
    assert result.exception is None, result.output
    figures = json.loads(report.read_text())
    assert figures["B"]["l2_distance"]["absolute"] > 0
    assert figures["B_aligned"]["l2_distance"]["absolute"] == 0
    assert figures["singular_value_invariance_error"] < 1e-4


def test_verify_falls_back_to_float32_when_float64_does_not_fit(
    llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _invoke(["verify", str(llama["a"]), "--spec", str(llama["spec"])])
    assert result.exception is None and "comparing in float32" not in result.output
    monkeypatch.setattr(spec_cmds, "_available_memory", lambda: 1024)
    result = _invoke(["verify", str(llama["a"]), "--spec", str(llama["spec"])])
    assert result.exception is None, result.output
    assert "comparing in float32, tolerance 1e-05 + 0.0001 x max |output|" in result.output
    assert "OK: outputs unchanged" in result.output


def test_barrier_and_merge_align_with_larger_symmetries(llama: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(llama["data"]))
    report = tmp_path / "full.json"
    result = _invoke(["barrier", str(llama["a"]), "--a", str(llama["a"]), "--b", str(llama["b"]), "--symmetries", "full",
                      "--data", "llama_eval_tokens:tokens", "--points", "3", "--json", str(report)])
    assert result.exception is None, result.output
    assert "aligned B to A with full symmetries" in result.output
    curve = json.loads(report.read_text())["curve"]["test_loss"]
    assert all(abs(loss - curve[0]) <= 1e-4 * curve[0] for loss in curve)  # the planted B aligns back onto A
    merged = tmp_path / "merged"
    result = _invoke(["merge", str(llama["a"]), str(llama["b"]), "--symmetries", "orthogonal", "-o", str(merged), "--quiet"])
    assert result.exception is None, result.output
    a = transformers.LlamaForCausalLM.from_pretrained(llama["a"]).state_dict()
    mean = transformers.LlamaForCausalLM.from_pretrained(merged).state_dict()
    assert max(float((mean[k] - a[k]).abs().max()) for k in a) < 1e-5
