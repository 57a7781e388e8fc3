"""MLP (3 x 512, ReLU, Adam 1e-3) on MNIST or Fashion-MNIST: naive vs weight-matched barrier.

The setting of Git Re-Basin (arXiv 2209.04836) and Ito et al. (arXiv 2402.04051). Needs
torchvision for MNIST; ``--dataset digits`` uses scikit-learn's 8x8 digits instead (no download).

    python examples/mlp_mnist.py --dataset mnist --root ~/data --epochs 30 --out mlp-mnist
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

from lmc_common import add_common_arguments, run

from autoperm.models import MLP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist", "digits"), default="mnist")
    parser.add_argument("--root", default="data", help="torchvision download folder")
    add_common_arguments(parser)
    return parser


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, int]:
    """Train and test loaders, and the number of input features."""
    if args.dataset == "digits":
        from autoperm.data import load_digits

        data = load_digits()
        test = DataLoader(TensorDataset(*data.test), batch_size=1000)
        return data.loader("train", args.batch_size), test, data.num_features
    try:
        from torchvision import datasets, transforms
    except ImportError:
        sys.exit("this example needs torchvision for MNIST (pip install torchvision), or use --dataset digits")
    dataset = datasets.MNIST if args.dataset == "mnist" else datasets.FashionMNIST
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = dataset(args.root, train=True, download=True, transform=transform)
    test = dataset(args.root, train=False, download=True, transform=transform)
    return DataLoader(train, args.batch_size, shuffle=True), DataLoader(test, 1000), 28 * 28


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_loader, test_loader, features = loaders(args)
    run(args, lambda: MLP(features, hidden=512, depth=3, num_classes=10), torch.zeros(2, features),
        train_loader, test_loader, optimizer="adam")


if __name__ == "__main__":
    main()
