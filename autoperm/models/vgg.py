"""VGG for CIFAR-10 with a width multiplier (Simonyan & Zisserman 2015; Git Re-Basin's setting)."""

from __future__ import annotations

import torch
from torch import nn

_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    """VGG feature stack, a flatten and a classifier.

    Args:
        config: channel counts with ``"M"`` for 2x2 max-pooling.
        width: width multiplier for every conv.
        num_classes: number of outputs.
        batch_norm: BatchNorm after each conv.
        classifier_width: hidden width of the classifier (0: a single Linear).
        image_size: input side, to size the flatten (32 for CIFAR-10).
    """

    def __init__(
        self,
        config: list[int | str],
        width: int = 1,
        num_classes: int = 10,
        batch_norm: bool = True,
        classifier_width: int = 512,
        image_size: int = 32,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        side = image_size
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                side //= 2
                continue
            out = int(item) * width
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        flat = channels * side * side
        if classifier_width:
            self.classifier = nn.Sequential(
                nn.Linear(flat, classifier_width * width),
                nn.ReLU(inplace=True),
                nn.Linear(classifier_width * width, classifier_width * width),
                nn.ReLU(inplace=True),
                nn.Linear(classifier_width * width, num_classes),
            )
        else:
            self.classifier = nn.Sequential(nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11(width: int = 1, num_classes: int = 10, batch_norm: bool = True, classifier_width: int = 512, image_size: int = 32) -> VGG:
    """VGG11 for CIFAR-10-sized inputs, with width multiplier ``width``."""
    return VGG(_VGG11, width, num_classes, batch_norm, classifier_width, image_size)
