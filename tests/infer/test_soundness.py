"""Property: for random architectures, a random permutation of the inferred spec keeps the outputs.

Hypothesis draws small networks from the building blocks that matter for permutation symmetry:
conv / linear stacks with norms and activations, residual blocks, concatenating branches,
depthwise convs, squeeze-and-excitation gates, GroupNorm, and flatten heads. For each, the
permuted model must compute the same function (eval mode, BatchNorm statistics included), and
every tensor listed in a group must actually move.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from autoperm.infer import infer_spec
from autoperm.spec import apply_permutation, permute_tensor
from autoperm.verify import verify_spec
from tests.conftest import perturb_

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "none": lambda x: x}


class ConvProgram(nn.Module):
    """A conv net assembled from a list of (kind, options) steps."""

    def __init__(self, steps: list[tuple[str, dict]], in_channels: int = 3, head: str = "flatten", classes: int = 3):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleList()
        channels = in_channels
        for kind, options in steps:
            width = options.get("width", channels)
            if kind == "conv":
                block = nn.ModuleDict({"conv": nn.Conv2d(channels, width, options["kernel"], padding=options["kernel"] // 2)})
                if options["norm"] == "bn":
                    block["norm"] = nn.BatchNorm2d(width)
                elif options["norm"] == "gn":
                    block["norm"] = nn.GroupNorm(options["gn_groups"] if width % options["gn_groups"] == 0 else 1, width)
                channels = width
            elif kind == "residual":
                block = nn.ModuleDict({"a": nn.Conv2d(channels, width, 3, padding=1), "bn": nn.BatchNorm2d(width),
                                       "b": nn.Conv2d(width, channels, 3, padding=1)})
            elif kind == "concat":
                block = nn.ModuleDict({"left": nn.Conv2d(channels, width, 1), "right": nn.Conv2d(channels, options["width2"], 3, padding=1)})
                channels = width + options["width2"]
            elif kind == "depthwise":
                block = nn.ModuleDict({"dw": nn.Conv2d(channels, channels, 3, padding=1, groups=channels), "bn": nn.BatchNorm2d(channels)})
            elif kind == "se":
                block = nn.ModuleDict({"reduce": nn.Conv2d(channels, width, 1), "expand": nn.Conv2d(width, channels, 1)})
            else:
                raise ValueError(kind)
            self.layers.append(block)
        self.channels = channels
        self.head_kind = head
        if head == "flatten":
            self.head = nn.Linear(channels * 4, classes)
        else:
            self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (kind, options), block in zip(self.steps, self.layers):
            act = ACTIVATIONS[options.get("act", "relu")]
            if kind == "conv":
                x = block["conv"](x)
                if "norm" in block:
                    x = block["norm"](x)
                x = act(x)
            elif kind == "residual":
                x = x + block["b"](act(block["bn"](block["a"](x))))
            elif kind == "concat":
                x = torch.cat([act(block["left"](x)), block["right"](x)], dim=1)
            elif kind == "depthwise":
                x = act(block["bn"](block["dw"](x)))
            elif kind == "se":
                gate = torch.sigmoid(block["expand"](F.relu(block["reduce"](x.mean((2, 3), keepdim=True)))))
                x = x * gate
        if self.head_kind == "flatten":
            return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))
        return self.head(x.mean((2, 3)))


class MLPProgram(nn.Module):
    """Linear layers with optional LayerNorm, residual connections and chunked (split) outputs."""

    def __init__(self, steps: list[tuple[str, dict]], in_features: int = 6, classes: int = 3):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleList()
        features = in_features
        for kind, options in steps:
            width = options["width"]
            if kind == "linear":
                block = nn.ModuleDict({"fc": nn.Linear(features, width)})
                if options["norm"]:
                    block["norm"] = nn.LayerNorm(width)
                features = width
            elif kind == "residual":
                block = nn.ModuleDict({"norm": nn.LayerNorm(features), "up": nn.Linear(features, width), "down": nn.Linear(width, features)})
            elif kind == "gated":
                block = nn.ModuleDict({"up": nn.Linear(features, 2 * width), "down": nn.Linear(width, features)})
            else:
                raise ValueError(kind)
            self.layers.append(block)
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (kind, options), block in zip(self.steps, self.layers):
            act = ACTIVATIONS[options.get("act", "relu")]
            if kind == "linear":
                x = block["fc"](x)
                if "norm" in block:
                    x = block["norm"](x)
                x = act(x)
            elif kind == "residual":
                x = x + block["down"](act(block["up"](block["norm"](x))))
            elif kind == "gated":
                gate, up = block["up"](x).chunk(2, dim=-1)
                x = x + block["down"](F.silu(gate) * up)
        return self.head(x)


widths = st.integers(min_value=2, max_value=6)
acts = st.sampled_from(sorted(ACTIVATIONS))
conv_step = st.one_of(
    st.tuples(st.just("conv"), st.fixed_dictionaries({"width": widths, "kernel": st.sampled_from([1, 3]), "norm": st.sampled_from(["bn", "gn", "none"]),
                                                      "gn_groups": st.sampled_from([1, 2]), "act": acts})),
    st.tuples(st.just("residual"), st.fixed_dictionaries({"width": widths, "act": acts})),
    st.tuples(st.just("concat"), st.fixed_dictionaries({"width": widths, "width2": widths, "act": acts})),
    st.tuples(st.just("depthwise"), st.fixed_dictionaries({"act": acts})),
    st.tuples(st.just("se"), st.fixed_dictionaries({"width": widths})),
)
mlp_step = st.one_of(
    st.tuples(st.just("linear"), st.fixed_dictionaries({"width": widths, "norm": st.booleans(), "act": acts})),
    st.tuples(st.just("residual"), st.fixed_dictionaries({"width": widths, "act": acts})),
    st.tuples(st.just("gated"), st.fixed_dictionaries({"width": widths})),
)


def _check_sound_and_moving(model: nn.Module, inputs: torch.Tensor, seed: int) -> None:
    model = perturb_(model.eval(), seed=seed)
    spec = infer_spec(model, inputs)
    report = verify_spec(model, spec, inputs, seed=seed, atol=1e-5, rtol=1e-4)
    assert report.passed, (report, spec.to_yaml())
    state = model.state_dict()
    for group in spec.active_groups:
        shift = torch.roll(torch.arange(group.size), 1)  # no index stays in place
        if group.per is not None:
            shift = shift.expand(spec[group.per].size, group.size)
        shift = {group.name: shift}
        for member in group.members:
            moved = permute_tensor(spec, shift, member.param, state[member.param])
            assert not torch.equal(moved, state[member.param]) or state[member.param].unique().numel() == 1, (group.name, member)
    assert apply_permutation(spec, {}, state).keys() == state.keys()


@given(steps=st.lists(conv_step, min_size=1, max_size=4), head=st.sampled_from(["flatten", "mean"]), seed=st.integers(0, 1000))
def test_random_conv_nets_are_sound(steps, head, seed):
    torch.manual_seed(seed)
    model = ConvProgram(steps, head=head)
    _check_sound_and_moving(model, torch.randn(2, 3, 6, 6), seed)


@given(steps=st.lists(mlp_step, min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_random_mlps_are_sound(steps, seed):
    torch.manual_seed(seed)
    model = MLPProgram(steps)
    _check_sound_and_moving(model, torch.randn(3, 6), seed)


def test_gated_mlp_shares_gate_and_up():
    model = MLPProgram([("linear", {"width": 4, "norm": False}), ("gated", {"width": 5})])
    spec = infer_spec(model, torch.randn(2, 6))
    hidden = [g for g in spec.active_groups if g.size == 5]
    assert len(hidden) == 1
    up = sorted(m.offset for m in hidden[0].members if m.param == "layers.1.up.weight")
    assert up == [0, 5]  # the gate half and the up half move together
