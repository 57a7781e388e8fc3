"""The model-directory example scripts import and parse their arguments (run by hand, not in CI)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_merge_llms_parses_directories(examples_on_path) -> None:
    module = importlib.import_module("merge_llms")
    args = module.build_parser().parse_args(["--models", "a", "b", "c", "--out", "merged", "--max-iter", "5"])
    assert [p.name for p in args.models] == ["a", "b", "c"] and args.out == Path("merged") and args.max_iter == 5
    assert module.build_parser().parse_args([]).models is None  # create small fine-tunes locally


def test_align_sd_unets_parses_directories(examples_on_path) -> None:
    module = importlib.import_module("align_sd_unets")
    args = module.build_parser().parse_args(["--a", "sd/unet", "--b", "other/unet", "--check-function"])
    assert args.a == Path("sd/unet") and args.b == Path("other/unet") and args.check_function
    with pytest.raises(SystemExit):
        module.main(["--a", "only-one"])


def test_align_sd_checkpoints_parses_files_and_pipelines(examples_on_path) -> None:
    module = importlib.import_module("align_sd_checkpoints")
    args = module.build_parser().parse_args(["--a", "a.safetensors", "--b", "b.safetensors", "--out", "b2.safetensors"])
    assert args.a == Path("a.safetensors") and args.out == Path("b2.safetensors") and args.max_iter == 100
    with pytest.raises(SystemExit):
        module.main(["--a", "a.safetensors", "--b", "b.safetensors"])  # --out is required with --a/--b
