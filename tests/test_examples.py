"""The example scripts import, parse their arguments and show help (they are not run in CI)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_mlp_example_parses_arguments(examples_on_path):
    module = importlib.import_module("mlp_mnist")
    args = module.build_parser().parse_args(["--dataset", "digits", "--epochs", "3", "--seeds", "4", "5"])
    assert args.dataset == "digits" and args.epochs == 3 and tuple(args.seeds) == (4, 5)
    assert args.points == 25 and args.lr == 1e-3
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(["--dataset", "imagenet"])


def test_cifar_example_parses_arguments(examples_on_path):
    module = importlib.import_module("cifar10_cnn")
    args = module.build_parser().parse_args(["--arch", "vgg11", "--width", "2"])
    assert args.arch == "vgg11" and args.width == 2 and args.lr == 0.1
    assert set(module.ARCHITECTURES) == {"vgg11", "resnet20"}
    model = module.ARCHITECTURES[args.arch](width=1)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("script", ["mlp_mnist.py", "cifar10_cnn.py"])
def test_examples_show_help(script):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--epochs" in result.stdout and "--out" in result.stdout
