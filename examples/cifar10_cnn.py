"""VGG11 or ResNet20 (with a width multiplier) on CIFAR-10: naive vs weight-matched barrier.

The CNN settings of Git Re-Basin (arXiv 2209.04836) and Ito et al. (arXiv 2402.04051). Needs
torchvision. BatchNorm statistics of every interpolated model are recomputed on the training set.
Wider models connect better; try ``--width 4`` or more on a GPU.

    python examples/cifar10_cnn.py --arch resnet20 --width 4 --epochs 100 --root ~/data --out r20
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from torch.utils.data import DataLoader

from lmc_common import add_common_arguments, run

from autoperm.models import resnet20, vgg11

ARCHITECTURES = {"vgg11": vgg11, "resnet20": resnet20}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="resnet20")
    parser.add_argument("--width", type=int, default=1, help="width multiplier")
    parser.add_argument("--root", default="data", help="torchvision download folder")
    add_common_arguments(parser)
    parser.set_defaults(lr=0.1, epochs=50)
    return parser


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        sys.exit("this example needs torchvision (pip install torchvision)")
    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    plain = transforms.Compose([transforms.ToTensor(), normalize])
    train = datasets.CIFAR10(args.root, train=True, download=True, transform=augment)
    test = datasets.CIFAR10(args.root, train=False, download=True, transform=plain)
    return DataLoader(train, args.batch_size, shuffle=True, num_workers=2), DataLoader(test, 1000, num_workers=2)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_loader, test_loader = loaders(args)
    factory = ARCHITECTURES[args.arch]
    run(args, lambda: factory(width=args.width), torch.zeros(2, 3, 32, 32), train_loader, test_loader, optimizer="sgd")


if __name__ == "__main__":
    main()
