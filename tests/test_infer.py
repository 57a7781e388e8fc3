"""Inference on architectures whose symmetries are derived by hand (completeness and soundness)."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import autoperm
from autoperm.infer import UnsupportedOpWarning, infer_spec
from autoperm.models import MLP, resnet20, vgg11
from autoperm.verify import verify_spec
from tests.conftest import perturb_


def _groups(spec):
    return {g.name: g for g in spec.active_groups}


def _check(model, inputs, seeds=(0, 1)):
    model = perturb_(model.eval())
    spec = infer_spec(model, inputs)
    for seed in seeds:
        report = verify_spec(model, spec, inputs, seed=seed)
        assert report.passed, report
    return spec


def test_mlp_has_one_group_per_hidden_layer():
    spec = _check(MLP(in_features=20, hidden=16), torch.randn(3, 20))
    groups = _groups(spec)
    assert sorted(groups) == ["layers.0", "layers.1", "layers.2"]
    assert {(m.param, m.axis) for m in groups["layers.2"].members} == {
        ("layers.2.weight", 0), ("layers.2.bias", 0), ("head.weight", 1)}


def test_resnet20_three_streams_nine_inner():
    spec = _check(resnet20(), torch.randn(2, 3, 32, 32), seeds=(0,))
    sizes = sorted(g.size for g in spec.active_groups)
    assert len(spec.active_groups) == 12
    assert sizes.count(16) == 4 and sizes.count(32) == 4 and sizes.count(64) == 4
    stream = _groups(spec)["conv1"]
    params = {m.param for m in stream.members}
    assert {"bn1.running_mean", "layer1.2.bn2.weight", "layer2.0.conv1.weight", "layer2.0.shortcut.0.weight"} <= params
    assert not any(p.endswith("num_batches_tracked") for g in spec.groups for p in (m.param for m in g.members))


def test_vgg_flatten_expands_channels():
    model = vgg11(width=1, classifier_width=32, image_size=64)
    spec = _check(model, torch.randn(1, 3, 64, 64), seeds=(0,))
    assert len(spec.active_groups) == 8 + 2
    last = _groups(spec)["features.25"]
    flat = [m for m in last.members if m.param == "classifier.0.weight"]
    assert flat == [autoperm.Member(param="classifier.0.weight", axis=1, inner=4)]


class DenseBlock(nn.Module):
    """Two densely connected layers: inputs are concatenated along channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
        self.b = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 5, 3, padding=1))
        self.norm = nn.BatchNorm2d(15)
        self.fc = nn.Linear(15 * 4, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.a(x)], 1)
        x = torch.cat([x, self.b(x)], 1)
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_concatenation_gives_one_group_per_part():
    spec = _check(DenseBlock(), torch.randn(2, 3, 8, 8))
    groups = _groups(spec)
    assert sorted(g.size for g in groups.values()) == [4, 5, 6]
    fc = {name: [m for m in g.members if m.param == "fc.weight"] for name, g in groups.items()}
    assert fc["stem"][0].offset == 0 and fc["stem"][0].inner == 4
    assert fc["a.2"][0].offset == 6 * 4 and fc["b.2"][0].offset == 10 * 4
    norm = [m for m in groups["b.2"].members if m.param == "norm.running_var"]
    assert norm[0].offset == 10


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, squeeze-and-excitation gate, project 1x1, residual."""

    def __init__(self, channels=8, expand=16):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.expand = nn.Conv2d(channels, expand, 1)
        self.depthwise = nn.Conv2d(expand, expand, 3, padding=1, groups=expand)
        self.se_reduce = nn.Conv2d(expand, 4, 1)
        self.se_expand = nn.Conv2d(4, expand, 1)
        self.project = nn.Conv2d(expand, channels, 1)
        self.head = nn.Linear(channels, 2)

    def forward(self, x):
        x = self.stem(x)
        h = F.hardswish(self.depthwise(F.relu6(self.expand(x))))
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        x = x + self.project(h * gate)
        return self.head(x.mean((2, 3)))


def test_depthwise_and_se_gate():
    spec = _check(InvertedResidual(), torch.randn(2, 3, 6, 6))
    groups = _groups(spec)
    assert sorted(groups) == ["expand", "se_reduce", "stem"]
    members = {(m.param, m.axis) for m in groups["expand"].members}
    assert {("depthwise.weight", 0), ("se_reduce.weight", 1), ("se_expand.weight", 0), ("project.weight", 1)} <= members


def test_grouped_conv_and_group_norm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.gn = nn.GroupNorm(2, 8)
            self.b = nn.Conv2d(8, 8, 3, groups=4)
            self.c = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(self.b(self.gn(self.a(x))))

    spec = _check(Net(), torch.randn(1, 3, 9, 9))
    # a's 8 channels: GroupNorm sees 2 groups x 4, the grouped conv 4 groups x 2; the common
    # refinement is 2 x 2 x 2. b's output adds its within-group channels (2).
    assert sorted(g.size for g in spec.active_groups) == [2, 2, 2, 2]


def test_layernorm_transformer_block_with_raw_parameters():
    class Tiny(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.patch = nn.Linear(12, d)
            self.cls = nn.Parameter(torch.randn(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, 5, d))
            self.norm1 = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
            self.norm2 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, 32)
            self.fc2 = nn.Linear(32, d)
            self.head = nn.Linear(d, 3)

        def forward(self, x):
            x = self.patch(x)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
            return self.head(x[:, 0])

    spec = _check(Tiny(), torch.randn(2, 4, 12))
    groups = _groups(spec)
    stream = groups["patch"]
    assert {"cls", "pos", "norm1.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"} <= {m.param for m in stream.members}
    assert sorted(g.size for g in groups.values()) == [4, 4, 4, 16, 32]  # heads, qk dim, v dim, stream, MLP


def test_untraceable_by_fx_falls_back_to_export():
    class RowByRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.stack([row * (i + 1) for i, row in enumerate(h)])  # iterating a tensor: torch.fx cannot
            return self.b(h)

    model = RowByRow()
    spec = _check(model, torch.randn(3, 4))
    assert spec.tracer == "export"
    assert [g.size for g in spec.active_groups] == [8]


class _ShapeBranches(nn.Module):
    """Python branches and arithmetic on shapes, as windowed attention and 'same' padding write them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.b = nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        height, width = h.shape[-2:]
        if height % 2 or width % 2:  # symbolic tracing fails here
            h = self.pad(h)
        scale = math.ceil(h.size(-1) / 2) / h.size(-1)
        if h.ndim == 4 and h.dtype == torch.float32:
            h = h * scale
        return self.b(h).flatten(1)


def test_branches_on_shapes_trace_with_fx_and_known_shapes():
    model = _ShapeBranches()
    x = torch.randn(2, 3, 7, 7)
    spec = _check(model, x)
    assert spec.tracer == "fx"
    assert [g.size for g in spec.active_groups] == [8]  # the padding module keeps the channels
    assert spec.completeness().share == 1.0


def test_shape_specialised_graphs_are_retraced_for_each_batch_shape():
    from autoperm.infer.registry import has_module_rule
    from autoperm.trace import record_activations

    model = _ShapeBranches().eval()
    spec = infer_spec(model, torch.randn(2, 3, 7, 7))
    node = spec.active_groups[0].activations[0].node
    batches = [torch.randn(4, 3, 7, 7), torch.randn(3, 3, 7, 7)]  # a smaller last batch
    recorded = record_activations(model, [node], batches, tracer=spec.tracer, is_leaf=has_module_rule)[node]
    assert [tuple(v.shape) for v in recorded] == [(4, 8, 7, 7), (3, 8, 7, 7)]
    assert torch.allclose(recorded[1], torch.relu(model.a(batches[1])))


def test_caches_a_traced_forward_stores_are_undone():
    class Cached(_ShapeBranches):
        table = None

        def forward(self, x):
            if self.table is None or self.table.shape[0] != x.shape[-1]:  # fails plain tracing, sets a cache
                self.table = torch.ones(x.shape[-1], device=self.a.weight.device)
            return super().forward(x * self.table)

    model = Cached().eval()
    x = torch.randn(2, 3, 7, 7)
    spec = infer_spec(model, x)
    assert spec.tracer == "fx"
    assert "table" not in model.__dict__ and not [n for n in model.__dict__ if n.startswith("_tensor_constant")]
    assert isinstance(model(x), torch.Tensor)


def test_shapes_propagate_on_meta_tensors_with_tensors_made_in_forward(caplog):
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)
            self.register_buffer("bands", torch.linspace(0.5, 2.0, 8), persistent=False)
            self.table = torch.linspace(1.0, 2.0, 5)  # a plain attribute: neither parameter nor buffer

        def forward(self, x):
            position = torch.arange(x.shape[1], dtype=x.dtype).unsqueeze(-1)  # made on the CPU, not on meta
            h = torch.relu(self.a(x)) + torch.cos(position * self.bands).sum(-1, keepdim=True)
            return self.b(h * self.table.unsqueeze(-1))

    caplog.set_level(logging.DEBUG, logger="autoperm.trace.fx_frontend")
    spec = _check(Positions(), torch.randn(2, 5, 4))
    assert spec.tracer == "fx"
    assert not [r for r in caplog.records if "real forward pass" in r.getMessage()]
    assert [g.size for g in spec.active_groups] == [8]


def test_unknown_op_keeps_axes_fixed_and_warns():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            h = F.local_response_norm(self.a(x).unsqueeze(-1), 2).squeeze(-1)  # mixes neighbouring units
            return self.c(torch.relu(self.b(h)))

    with pytest.warns(UnsupportedOpWarning, match="local_response_norm"):
        spec = infer_spec(Odd(), torch.randn(2, 4))
    assert [g.name for g in spec.active_groups] == ["b"]
    assert verify_spec(Odd(), spec, torch.randn(2, 4)).passed


def test_registered_module_rule_is_used():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return torch.cumsum(x, 0) * 0 + x * self.scale  # would be "unknown" if traced through

    def rule(ctx, call):
        ctx.elementwise([call.input(0), ctx.state("scale")], call.out)

    autoperm.register_module_rule(Scale, rule)
    model = nn.Sequential(nn.Linear(3, 5), Scale(5), nn.Linear(5, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        spec = _check(model, torch.randn(2, 3))
    assert {(m.param, m.axis) for m in spec.active_groups[0].members} >= {("1.scale", 0)}


def test_inputs_and_outputs_are_fixed():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    spec = infer_spec(model, torch.randn(2, 4))
    assert spec.active_groups == ()


def test_tied_weights_are_permuted_together():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.mid(self.embed(ids))))

    model = Tied()
    spec = _check(model, torch.randint(0, 10, (2, 5)))
    members = {(m.param, m.axis) for g in spec.active_groups for m in g.members}
    assert ("embed.weight", 1) in members and ("out.weight", 1) in members


def test_trace_error_message_names_both_front_ends():
    class Bad(nn.Module):
        def forward(self, x):
            return torch.tensor([float(v) for v in x.flatten().tolist() if v > 0]).sum()

    with pytest.raises(autoperm.TraceError, match="torch.fx.*\n.*torch.export"):
        infer_spec(Bad(), torch.randn(3))


def test_bad_inputs_are_reported():
    with pytest.raises(autoperm.TraceError, match="do not fit"):
        infer_spec(nn.Linear(3, 2), (torch.randn(1, 3), torch.randn(1, 3)))
    with pytest.raises(autoperm.TraceError, match="3 != 4|shape|size|mat1"):
        infer_spec(nn.Linear(4, 2), torch.randn(2, 3))


def test_model_state_is_untouched():
    model = resnet20().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    infer_spec(model, torch.randn(1, 3, 32, 32))
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_proj"])
def test_recurrent_layers_trace_with_their_output_shapes(kind: str) -> None:
    class Sequence(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 6)
            if kind == "gru":
                self.rnn = nn.GRU(6, 5, batch_first=True, bidirectional=True)
            else:
                self.rnn = nn.LSTM(6, 5, batch_first=True, bidirectional=True, proj_size=4 if kind == "lstm_proj" else 0)
            self.out = nn.Linear(10 if kind != "lstm_proj" else 8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.rnn(self.inp(x))[0]))

    model = perturb_(Sequence().double().eval())
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    spec = infer_spec(model, (x,))
    assert spec.tracer == "fx"
    assert all(verify_spec(model, spec, (x,), seed=seed).passed for seed in range(3))
    hidden = [g for g in spec.active_groups if g.name.startswith("rnn.")]
    if kind == "lstm_proj":  # a projection is not followed: the recurrent units stay fixed
        assert not hidden
    else:  # one permutation of the 5 units for both directions (the final states stack them)
        assert [g.size for g in hidden] == [5]
        assert {m.param for m in hidden[0].members} >= {"rnn.weight_hh_l0", "rnn.weight_hh_l0_reverse", "out.weight"}


def test_recurrent_final_state_returned_keeps_its_units_fixed() -> None:
    class Returns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 5, num_layers=2)
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y, (h, _) = self.rnn(x)
            return self.out(y), h

    model = perturb_(Returns().double().eval())
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    spec = infer_spec(model, (x,))
    assert not spec.active_groups
    assert verify_spec(model, spec, (x,)).passed


@pytest.mark.parametrize("tracer", ["auto", "export"])
def test_slice_assignment_couples_the_written_values(tracer: str) -> None:
    class Assign(nn.Module):  # MViTv2 adds relative-position terms into a slice of the attention map in place
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.g = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x)).transpose(1, 2).clone()  # (batch, units, tokens)
            h[:, :, 1:] = h[:, :, 1:] * 2 + self.g(x[:, 1:]).transpose(1, 2)
            return self.b(h.transpose(1, 2))

    model = perturb_(Assign().double().eval())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    spec = infer_spec(model, (x,), tracer=tracer)
    assert spec.tracer == ("export" if tracer == "export" else "fx")  # item assignment is traced with known shapes
    assert all(verify_spec(model, spec, (x,), seed=seed).passed for seed in range(3))
    assert [g.size for g in spec.active_groups] == [6]
    assert {m.param for m in spec.active_groups[0].members} >= {"a.weight", "g.weight", "b.weight"}


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_unfold_and_fold_keep_channels_permutable(tracer: str) -> None:
    class Patches(nn.Module):  # VOLO's outlook attention and TNT unfold channels into (channel, kernel position) rows
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.unfold = nn.Unfold(2, stride=2)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            columns = self.unfold(h)  # (batch, 4 * 2 * 2, blocks)
            weights = columns.view(h.shape[0], 4, 4, -1).softmax(2).flatten(1, 2)  # mixes kernel positions only
            return self.b(F.fold(columns * weights, h.shape[-2:], 2, stride=2) + h)

    model = perturb_(Patches().double().eval())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    spec = infer_spec(model, (x,), tracer=tracer)
    assert all(verify_spec(model, spec, (x,), seed=seed).passed for seed in range(3))
    assert [g.size for g in spec.active_groups] == [4]
    assert spec.completeness().share == 1.0


def test_scalar_write_into_some_units_keeps_them_fixed() -> None:
    class Zeroes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x)).clone()
            if h.shape[0] > 1:  # traced with known shapes
                h[:, :2] = 0.0  # units 0 and 1 are written, the others are not
            return self.b(h)

    model = perturb_(Zeroes().double().eval())
    x = torch.randn(3, 4, dtype=torch.float64)
    spec = infer_spec(model, (x,))
    assert spec.tracer == "fx"
    assert all(verify_spec(model, spec, (x,), seed=seed).passed for seed in range(3))
    assert not spec.active_groups
