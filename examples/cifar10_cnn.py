"""VGG11 or ResNet20 (with a width multiplier) on CIFAR-10: the experiment of Ito et al.

The CNN settings of Git Re-Basin (arXiv 2209.04836) and Ito et al. (arXiv 2402.04051), with
the report of ``autoperm demo`` (naive / weight matching / activation matching / STE; barriers,
L2 distance, R at gamma 0 and 0.3, anchor scheme, MergeMany, the findings). BatchNorm
statistics of every evaluated model are recomputed on the training set. One command per setting:

    python examples/cifar10_cnn.py --arch vgg11 --width 1 --root ~/data --out vgg11-w1
    python examples/cifar10_cnn.py --arch resnet20 --width 4 --root ~/data --out resnet20-w4

The data comes through torchvision from ``--root``; ``--download`` lets torchvision fetch it.
Wider models connect better; use a GPU (``--device cuda``, the default when one is present).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from torch.utils.data import Dataset

from lmc_common import add_common_arguments, run, torchvision_dataset, torchvision_transforms

from autoperm.models import resnet20, vgg11

ARCHITECTURES = {"vgg11": vgg11, "resnet20": resnet20}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="resnet20")
    parser.add_argument("--width", type=int, default=1, help="width multiplier")
    add_common_arguments(parser)
    parser.set_defaults(lr=0.1, epochs=100, am_batches=4)
    return parser


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, Dataset]:
    """CIFAR-10 from ``--root``: the augmented training set (flips, 4-pixel crops), the same set
    without augmentation (for matching, BatchNorm resets and train barriers), and the test set."""
    transforms = torchvision_transforms()
    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    plain = transforms.Compose([transforms.ToTensor(), normalize])
    train = torchvision_dataset("CIFAR10", args.root, args.download, True, augment)
    match = torchvision_dataset("CIFAR10", args.root, args.download, True, plain)
    test = torchvision_dataset("CIFAR10", args.root, args.download, False, plain)
    return train, match, test


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the report it wrote to ``--out``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train, match, test = datasets(args)
    factory = ARCHITECTURES[args.arch]
    return run(args, lambda: factory(width=args.width), torch.zeros(2, 3, 32, 32), train, test, optimizer="sgd",
               setting=f"{args.arch} x{args.width} on CIFAR-10", match_set=match)


if __name__ == "__main__":
    main()
