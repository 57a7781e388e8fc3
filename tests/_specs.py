"""Hand-written permutation specs and small models shared by the solver tests.

They do not depend on spec inference, so the solvers are tested against an independent
description of each architecture's symmetries.
"""

from __future__ import annotations

import torch
from torch import nn

from autoperm import PermutationSpec
from autoperm.models import MLP, resnet20

_BN = ("weight", "bias", "running_mean", "running_var")


def build_spec(model: nn.Module, groups: dict[str, list[tuple[str, int] | tuple[str, int, int]]]) -> PermutationSpec:
    """A spec from ``{group: [(param, axis[, inner]), ...]}`` with the model's shapes."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    sizes = {}
    for name, members in groups.items():
        param, axis, *rest = members[0]
        sizes[name] = shapes[param][axis] // (rest[0] if rest else 1)
        for member in members:  # a typo in a hand-written spec must not pass silently
            assert member[0] in shapes, f"hand-written spec names unknown parameter {member[0]!r}"
            assert shapes[member[0]][member[1]] == sizes[name] * (member[2] if len(member) > 2 else 1), member
    return PermutationSpec.model_validate(
        {
            "groups": [
                {
                    "name": name,
                    "size": sizes[name],
                    "members": [
                        {"param": m[0], "axis": m[1], **({"inner": m[2]} if len(m) > 2 else {})} for m in members
                    ],
                }
                for name, members in groups.items()
            ],
            "shapes": shapes,
        }
    )


def bn(prefix: str) -> list[tuple[str, int]]:
    return [(f"{prefix}.{field}", 0) for field in _BN]


def mlp_spec(model: MLP) -> PermutationSpec:
    depth = len(model.layers)
    groups = {}
    for i in range(depth):
        following = f"layers.{i + 1}.weight" if i + 1 < depth else "head.weight"
        groups[f"hidden{i}"] = [(f"layers.{i}.weight", 0), (f"layers.{i}.bias", 0), (following, 1)]
    return build_spec(model, groups)


class ConvNet(nn.Module):
    """conv-BN-ReLU x2 (the second with stride 2), flatten, Linear-ReLU-Linear; inputs 3x8x8."""

    def __init__(self, channels: tuple[int, int] = (6, 5), hidden: int = 7, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[1])
        self.fc1 = nn.Linear(channels[1] * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def convnet_spec(model: ConvNet) -> PermutationSpec:
    return build_spec(
        model,
        {
            "c1": [("conv1.weight", 0), ("conv1.bias", 0), *bn("bn1"), ("conv2.weight", 1)],
            "c2": [("conv2.weight", 0), *bn("bn2"), ("fc1.weight", 1, 16)],
            "f1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)],
        },
    )


def resnet20_spec(model: nn.Module) -> PermutationSpec:
    """Stream group per stage (residual additions tie it), one inner group per block."""
    groups: dict[str, list] = {"stream0": [("conv1.weight", 0), *bn("bn1")]}
    for stage in range(3):
        stream = groups.setdefault(f"stream{stage}", [])
        for block in range(3):
            prefix = f"layer{stage + 1}.{block}"
            module = model.get_submodule(prefix)
            groups[f"{prefix}.inner"] = [(f"{prefix}.conv1.weight", 0), *bn(f"{prefix}.bn1"), (f"{prefix}.conv2.weight", 1)]
            stream += [(f"{prefix}.conv2.weight", 0), *bn(f"{prefix}.bn2")]
            inputs = [(f"{prefix}.conv1.weight", 1)]
            if len(module.shortcut):
                stream += [(f"{prefix}.shortcut.0.weight", 0), *bn(f"{prefix}.shortcut.1")]
                inputs.append((f"{prefix}.shortcut.0.weight", 1))
            previous = f"stream{stage - 1}" if block == 0 and stage > 0 else f"stream{stage}"
            groups[previous] += inputs
    groups["stream2"].append(("linear.weight", 1))
    return build_spec(model, groups)


def train_briefly(model: nn.Module, inputs: torch.Tensor, steps: int = 5, seed: int = 0) -> nn.Module:
    """A few SGD steps on random labels, so weights are no longer at initialisation."""
    torch.manual_seed(seed)
    with torch.no_grad():
        num_classes = model(inputs[:2]).shape[-1]
    targets = torch.randint(0, num_classes, (inputs.shape[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model


def record_lap_methods(monkeypatch, module) -> list[str]:
    """Record the ``method`` of every ``linear_assignment`` call ``module`` makes (it still solves)."""
    methods: list[str] = []
    original = module.linear_assignment

    def recording(score, *args, method="auto", **options):
        methods.append(method)
        return original(score, *args, method=method, **options)

    monkeypatch.setattr(module, "linear_assignment", recording)
    return methods


__all__ = [
    "ConvNet", "MLP", "build_spec", "convnet_spec", "mlp_spec", "record_lap_methods", "resnet20", "resnet20_spec",
    "train_briefly",
]
