"""Soundness by construction and the completeness report.

A rule that says nothing about an axis of a tensor its op touches must not leave that axis free:
the engine keeps it fixed, so a misread call can only cost symmetry, never soundness. The spec
records how many hidden units are permutable and, for every hidden axis kept fixed, why.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autoperm
from autoperm import apply_permutation, infer_spec, random_permutation
from autoperm.infer.registry import _MODULE_RULES


@torch.no_grad()
def _relative_change(model: nn.Module, spec, inputs: tuple, seeds=(0, 1)) -> float:
    model = model.double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    state = model.state_dict()
    reference = model(*inputs)
    worst = 0.0
    for seed in seeds:
        model.load_state_dict(apply_permutation(spec, random_permutation(spec, seed=seed), state))
        worst = max(worst, float((model(*inputs) - reference).abs().max() / reference.abs().max()))
    model.load_state_dict(state)
    return worst


class Contract(nn.Module):
    """``x @ W`` written as a module whose (deliberately empty) rule forgets every axis."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class WithContract(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.contract = Contract()
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.contract(torch.relu(self.inp(x)))))


def test_axes_a_rule_forgets_are_kept_fixed_and_explained() -> None:
    autoperm.register_module_rule(Contract, lambda ctx, call: None)
    try:
        torch.manual_seed(0)
        model = WithContract()
        spec = infer_spec(model, (torch.randn(2, 4),))
    finally:
        _MODULE_RULES.pop(Contract, None)
    assert not spec.active_groups  # inp's units feed the contraction: nothing may move
    assert _relative_change(model, spec, (torch.randn(2, 4),)) < 1e-12
    report = spec.completeness()
    reasons = {f.param: f.reason for f in report.fixed}
    assert "does not cover this axis" in reasons["inp.weight"] and "contract" in reasons["inp.weight"]
    assert report.permutable_units == 0 and report.hidden_units == 6
    assert report.output_units == 3  # the classifier's units are outputs, not hidden units


class RelativePositionAttention(nn.Module):
    """Decomposed relative-position terms computed from q (MViTv2), added in place into a slice."""

    def __init__(self, dim: int = 8, size: int = 3) -> None:
        super().__init__()
        self.size = size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel_pos = nn.Parameter(torch.randn(2 * size - 1, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = q @ k.transpose(-2, -1)
        positions = torch.arange(self.size)
        distance = positions[:, None] - positions[None, :] + self.size - 1
        table = self.rel_pos[distance]                      # an index tensor on axis 0
        rel = torch.einsum("bqc,qkc->bqk", q[:, : self.size], table)
        attn[:, : self.size, : self.size] = attn[:, : self.size, : self.size] + rel
        return self.proj(attn.softmax(-1) @ v + q)


def test_relative_position_terms_keep_the_spec_sound() -> None:
    torch.manual_seed(0)
    model = RelativePositionAttention()
    inputs = (torch.randn(2, 5, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, inputs)  # item assignment: torch.export
    assert _relative_change(model, spec, inputs) < 1e-12
    for group in spec.active_groups:  # whatever carries q's channels carries the table's too
        params = {m.param for m in group.members}
        if "qkv.weight" in params:
            assert "rel_pos" in params


def test_einsum_through_export_couples_its_operands() -> None:
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(4, 6)
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.einsum("nc,mc->nm", self.a(x), self.b(x))[:, :5])

    torch.manual_seed(0)
    model = Bilinear()
    spec = infer_spec(model, (torch.randn(5, 4),), tracer="export")
    shared = [g for g in spec.active_groups if {m.param for m in g.members} >= {"a.weight", "b.weight"}]
    assert len(shared) == 1 and shared[0].size == 6
    assert _relative_change(model, spec, (torch.randn(5, 4),)) < 1e-12


def test_report_counts_hidden_units_and_yaml_round_trip() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = infer_spec(model, (torch.randn(2, 4),))
    report = spec.completeness()
    assert (report.hidden_units, report.permutable_units, report.output_units) == (16, 16, 3)
    assert report.share == 1.0 and not report.fixed
    again = autoperm.PermutationSpec.from_yaml(spec.to_yaml())
    assert again.completeness() == report


def test_hand_written_spec_has_no_report() -> None:
    spec = autoperm.PermutationSpec(groups=())
    with pytest.raises(autoperm.SpecError, match="regenerate"):
        spec.completeness()


@pytest.mark.parametrize("reps", [(1, 3), (2, 1, 2)])
def test_repeat_tiles_the_group(reps) -> None:
    class Tile(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.out = nn.Linear(4 * reps[-1], 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.inp(x)).repeat(*reps)).sum(0)

    torch.manual_seed(0)
    model = Tile()
    spec = infer_spec(model, (torch.randn(5, 3),))
    assert [g.size for g in spec.active_groups] == [4] and spec.completeness().share == 1.0
    assert _relative_change(model, spec, (torch.randn(5, 3),)) < 1e-12


class ZeroKeyBias(nn.Module):
    """BEiT's attention: the fused qkv bias is ``cat(q_bias, k_bias, v_bias)`` with ``k_bias`` a
    zero buffer kept out of the state dict (or, with ``ones``, a constant that is not uniform)."""

    def __init__(self, dim: int = 8, heads: int = 2, constant: str = "zeros") -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        fill = torch.zeros(dim) if constant == "zeros" else torch.arange(dim, dtype=torch.float32)
        self.register_buffer("k_bias", fill, persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = nn.functional.linear(x, self.qkv.weight, bias).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return x + self.proj(out)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_uniform_constant_keeps_its_symmetry(tracer: str) -> None:
    torch.manual_seed(0)
    inputs = (torch.randn(2, 5, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(ZeroKeyBias(), inputs, tracer=tracer)
        other = infer_spec(ZeroKeyBias(constant="arange"), inputs, tracer=tracer)
    assert _relative_change(ZeroKeyBias(), spec, inputs) < 1e-12
    # the zero key bias moves with the key channels: heads and per-head dims for q/k and v/o
    assert sum(g.per is not None for g in spec.active_groups) == 2
    assert spec.completeness().share == 1.0
    # a constant that is not uniform keeps the key channels it is added to fixed, and says why
    assert other.completeness().share < 1.0
    assert any("constant tensor" in fixed.reason for fixed in other.completeness().fixed)
    assert _relative_change(ZeroKeyBias(constant="arange"), other, inputs) < 1e-12


def test_type_as_reads_only_the_dtype_of_its_argument() -> None:
    class RotaryLike(nn.Module):
        """``table.type_as(q)``: the table takes q's dtype, not its channels (EVA-02's RoPE)."""

        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)
            self.register_buffer("table", torch.linspace(0.5, 1.5, 5 * 6).reshape(5, 6), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)
            scale = self.table.type_as(q).sum()  # reads the dtype of q only
            return self.out(torch.relu(q) * scale)

    torch.manual_seed(0)
    model = RotaryLike()
    inputs = (torch.randn(5, 4),)
    spec = infer_spec(model, inputs)
    assert [g.size for g in spec.active_groups] == [6]
    assert _relative_change(model, spec, inputs) < 1e-12


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_repeat_interleave_repeats_kv_heads(tracer: str) -> None:
    class GroupedQuery(nn.Module):
        """timm's grouped-query attention: ``k.repeat_interleave(groups, dim=1)`` over the heads."""

        def __init__(self, dim: int = 12, heads: int = 4, kv_heads: int = 2) -> None:
            super().__init__()
            self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, tokens, dim = x.shape
            q = self.q(x).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
            k, v = self.kv(x).reshape(batch, tokens, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            out = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
            return x + self.proj(out)

    torch.manual_seed(0)
    model = GroupedQuery()
    inputs = (torch.randn(2, 5, 12),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, inputs, tracer=tracer)
    assert _relative_change(model, spec, inputs) < 1e-12
    assert spec.completeness().share == 1.0
    sizes = sorted(g.size for g in spec.active_groups)
    assert 2 in sizes  # the key/value heads move together with their query heads


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_fused_qkv_split_after_a_reshape_that_merges_spatial_axes(tracer: str) -> None:
    class WindowAttention(nn.Module):
        """SAM2's Hiera: ``qkv(x).reshape(B, H * W, 3, heads, -1)`` on a (B, H, W, C) input, then
        ``torch.unbind(qkv, 2)``: the reshape merges H and W as it cuts the channels."""

        def __init__(self, dim: int = 12, heads: int = 3) -> None:
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, height, width, _ = x.shape
            qkv = self.qkv(x).reshape(batch, height * width, 3, self.heads, -1)
            q, k, v = torch.unbind(qkv, 2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(batch, height, width, -1)
            return x + self.proj(out)

    torch.manual_seed(0)
    model = WindowAttention()
    inputs = (torch.randn(2, 3, 2, 12),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, inputs, tracer=tracer)
    assert _relative_change(model, spec, inputs) < 1e-12
    assert spec.completeness().share == 1.0
    assert sorted(g.size for g in spec.active_groups if g.per) == [4, 4]  # per head: q/k dims, v/o dims


@pytest.mark.parametrize("tile", [(2,), (1, 2), (3, 1, 2)])
def test_tile_tiles_the_group(tile) -> None:
    class Tiled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.out = nn.Linear(4 * tile[-1], 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.a(x)).tile(tile)).sum(0)

    torch.manual_seed(0)
    model = Tiled()
    spec = infer_spec(model, (torch.randn(5, 3),))
    assert [g.size for g in spec.active_groups] == [4]
    assert _relative_change(model, spec, (torch.randn(5, 3),)) < 1e-12


def test_unfold_keeps_the_channels_of_its_windows() -> None:
    class Blocked(nn.Module):
        """HaloNet: key/value windows cut out of a feature map with ``unfold``."""

        def __init__(self) -> None:
            super().__init__()
            self.kv = nn.Conv2d(2, 6, 1)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            windows = self.kv(x).unfold(2, 3, 2).unfold(3, 3, 2)  # (B, C, nh, nw, 3, 3)
            return self.out(windows.mean((2, 3, 4, 5)))

    torch.manual_seed(0)
    model = Blocked()
    inputs = (torch.randn(1, 2, 7, 7),)
    spec = infer_spec(model, inputs)
    assert [g.size for g in spec.active_groups] == [6]
    assert _relative_change(model, spec, inputs) < 1e-12


@pytest.mark.parametrize("same_filter", [True, False])
def test_constant_filter_repeated_per_channel_keeps_the_channels_free(same_filter: bool) -> None:
    class Blur(nn.Module):
        """ResNet-blur's anti-aliasing: a depthwise conv with a constant filter for every channel."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            kernel = torch.tensor([1.0, 2.0, 1.0])
            filt = (kernel[:, None] * kernel[None, :] / 16).expand(4, 1, 3, 3).clone()
            if not same_filter:
                filt = filt * torch.arange(1.0, 5.0).view(4, 1, 1, 1)
            self.register_buffer("filt", filt, persistent=False)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.conv2d(torch.relu(self.conv(x)), self.filt, stride=2, groups=4)
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Blur()
    inputs = (torch.randn(1, 2, 6, 6),)
    spec = infer_spec(model, inputs)
    assert [g.size for g in spec.active_groups] == ([4] if same_filter else [])
    assert _relative_change(model, spec, inputs) < 1e-12
