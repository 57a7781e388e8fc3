"""Reference architectures used in the linear-mode-connectivity literature.

- :class:`MLP`: 3 hidden layers of 512 with ReLU (Git Re-Basin; Ito et al. on MNIST).
- :func:`vgg11`: VGG11 for CIFAR-10 with a width multiplier, BatchNorm optional.
- :func:`resnet20`: ResNet20 for CIFAR-10 with a width multiplier (He et al. 2016 CIFAR variant).

Each is importable from the CLI, e.g. ``autoperm spec autoperm.models:resnet20 --kwargs width=2``.
"""

from autoperm.models.mlp import MLP
from autoperm.models.resnet import ResNet, resnet20
from autoperm.models.vgg import VGG, vgg11

__all__ = [
    "MLP",
    "ResNet",
    "VGG",
    "resnet20",
    "vgg11",
]
