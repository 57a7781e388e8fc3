"""Multi-layer perceptron of the literature: flatten, hidden Linear + ReLU layers, classifier."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``in_features -> hidden x depth (ReLU) -> num_classes``; default 784 -> 512 x 3 -> 10.

    Args:
        in_features: size of the flattened input (784 for 28x28 images, 64 for 8x8 digits).
        hidden: width of every hidden layer.
        depth: number of hidden layers.
        num_classes: number of outputs.
    """

    def __init__(self, in_features: int = 784, hidden: int = 512, depth: int = 3, num_classes: int = 10):
        super().__init__()
        widths = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)
