"""The example scripts import, parse their arguments and show help (they are not run in CI)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import optional_import

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
"""Scripts import the autoperm of this checkout, not whichever one is installed."""


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_mlp_example_parses_arguments(examples_on_path):
    module = importlib.import_module("mlp_mnist")
    args = module.build_parser().parse_args(["--dataset", "fashion-mnist", "--epochs", "3", "--seeds", "4", "5", "6"])
    assert args.dataset == "fashion-mnist" and args.epochs == 3 and tuple(args.seeds) == (4, 5, 6)
    assert args.points == 25 and args.lr == 1e-3 and args.hidden == 512 and args.wm_seeds == 5
    assert args.ste_epochs == 10 and args.ste_optimizer == "adam" and not args.download
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(["--dataset", "imagenet"])


def test_cifar_example_parses_arguments(examples_on_path):
    module = importlib.import_module("cifar10_cnn")
    args = module.build_parser().parse_args(["--arch", "vgg11", "--width", "2"])
    assert args.arch == "vgg11" and args.width == 2 and args.lr == 0.1 and args.am_batches == 4
    assert set(module.ARCHITECTURES) == {"vgg11", "resnet20"}
    model = module.ARCHITECTURES[args.arch](width=1)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("script", ["mlp_mnist.py", "cifar10_cnn.py"])
def test_examples_show_help(script):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "--epochs" in result.stdout and "--out" in result.stdout


@pytest.mark.parametrize(("script", "options", "dataset"), [("mlp_mnist.py", ["--dataset", "fashion-mnist"], "FashionMNIST")])
def test_missing_data_gives_one_clear_message(script, options, dataset, tmp_path):
    optional_import("torchvision")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *options, "--root", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert result.returncode != 0
    assert f"{dataset} was not found under --root" in result.stderr and "--download" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir()) or not (tmp_path / "out").exists()  # nothing downloaded or written
