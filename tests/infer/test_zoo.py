"""Inference on torchvision's model zoo: soundness, and exact group counts derived by hand.

These are definitions no one here wrote. Every model is built with ``num_classes=10``, its
weights are perturbed (zero-initialised heads, unit BatchNorm weights and zero running means
would make a wrong permutation invisible), and checked two ways:

* soundness: a random permutation drawn from the inferred spec leaves the outputs unchanged;
* completeness: the number of active groups equals the count derived from the architecture in
  ``EXPECTED_GROUPS`` (the comment next to each number is the derivation), and a few structural
  facts (flatten expansion, concatenation offsets, depthwise ties, fibred groups) hold.

Skipped where torchvision is not installed (CI's main environment).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tests.conftest import optional_import

torchvision = optional_import("torchvision")

from autoperm.infer import UnsupportedOpWarning, infer_spec  # noqa: E402
from autoperm.spec import Member, PermutationGroup, PermutationSpec  # noqa: E402
from autoperm.verify import verify_spec  # noqa: E402
from tests.conftest import group_of, only_group  # noqa: E402
import autoperm  # noqa: E402

EXPECTED_GROUPS: dict[str, int] = {
    # BasicBlock (expansion 1). layer1 keeps 64 channels at stride 1, so it has no downsample and
    # shares the stem's stream; layer2-4 each start a new stream with a 1x1 downsample: 4 streams.
    # One inner channel set per block (conv1 -> bn1 -> conv2): 8. Total 12.
    "resnet18": 12,
    # Bottleneck (expansion 4). layer1.0 has a downsample (64 -> 256), so the stem (conv1, bn1,
    # the inputs of layer1.0.conv1 and its downsample) is a stream of its own: 1 + 4 stage
    # streams = 5. Two inner sets per block (conv1 out, conv2 out) x 16 blocks = 32. Total 37.
    "resnet50": 37,
    # Concatenation: every part of a dense block's growing feature map is its own group.
    # "Initial" parts: conv0 (64) and transition1-3 outputs = 4. Each dense layer adds its 32
    # new channels (conv2 out) and has a 128-channel bottleneck (conv1 out): 2 x (6 + 12 + 24
    # + 16) = 116. Total 120.
    "densenet121": 120,
    # Stem (32) tied through block 1's depthwise conv (t = 1, no expansion): 1. One stream per
    # stage c = 16, 24, 32, 64, 96, 160, 320 (repeats joined by residuals, first block of a stage
    # has no residual): 7. One expanded set per t = 6 block, tied across its depthwise conv:
    # 2 + 3 + 4 + 3 + 3 + 1 = 16. Final 1x1 conv to 1280: 1. Total 25.
    "mobilenet_v2": 25,
    # Block 1 (no expansion): stem 16 tied through its depthwise conv and SE gate, the SE
    # squeeze (8), the projection out (16, no residual at stride 2): 3. Expanded sets of blocks
    # 2-11 (depthwise and SE gate tied): 10. SE squeezes of blocks 4-11: 8. Streams 24, 40, 48,
    # 96 (residual repeats): 4. Last conv 576: 1. Classifier hidden 1024: 1. Total 27.
    "mobilenet_v3_small": 27,
    # Stem 32 tied through block 1's depthwise conv and SE gate: 1; block 1's SE squeeze: 1.
    # Blocks 2-16 each have an expanded set (depthwise + SE gate tied) and an SE squeeze: 30.
    # One stream per stage (16, 24, 40, 80, 112, 192, 320): 7. Head conv 1280: 1. Total 40.
    "efficientnet_b0": 40,
    # Stem conv 96: 1. Each of the 8 fire modules: squeeze, expand1x1 part and expand3x3 part of
    # the concatenation: 24. The classifier conv's output is the network output. Total 25.
    "squeezenet1_0": 25,
    # 8 convs (64, 128, 256, 256, 512, 512, 512, 512), the last flattened over 7 x 7 positions
    # into classifier.0; two hidden Linear layers of 4096. Total 10.
    "vgg11": 10,
    # Same as vgg11; BatchNorm vectors and running stats ride along. Total 10.
    "vgg11_bn": 10,
    # Channel shuffles keep their axes fixed (REFERENCE.md), so every branch output (which goes
    # into cat + shuffle) is fixed. Free: the stem conv1 (24, tied through stage2.0.branch1's
    # depthwise conv) 1; each of the 4 + 8 + 4 blocks' branch2 mid channels (1x1 -> depthwise ->
    # 1x1): 16; conv5 (1024): 1. Total 18.
    "shufflenet_v2_x0_5": 18,
    # Widths 32, 64, 160, 400, depths 1, 2, 7, 12, group width 16. Stem separate (block1-0 has a
    # projection): 1 + 4 stage streams = 5. Each block's grouped 3x3 conv (2, 4, 10, 25 groups)
    # gives 3 groups: the permutation of the conv groups, the 16 channels inside a group on the
    # input side (shared by all groups: conv b's weight axis 1 is common to every group, so a
    # per-group permutation cannot be written as a member) and on the output side (fibred, one
    # permutation per conv group): 22 x 3 = 66. Total 71.
    "regnet_x_400mf": 71,
    # conv1 64, conv2 64, conv3 192: 3. Each of the 9 inception modules: 4 concatenated branch
    # outputs + 2 reduce convs (3x3 and "5x5" branches): 54. Total 57.
    "googlenet": 57,
    # As resnet50 (5 streams) but conv2 is grouped (32 groups of 4): 3 groups per block as for
    # regnet (conv-group permutation, shared input-side, fibred output-side): 16 x 3 = 48.
    # Total 53.
    "resnext50_32x4d": 53,
    # Stem + stage 1 is one stream; each downsample (LayerNorm2d + 2x2 conv) starts a new one:
    # 4 streams (depthwise conv, LayerNorm, layer scale all ride along). One MLP hidden set
    # (4 x dim) per block: 3 + 3 + 9 + 3 = 18. Total 22.
    "convnext_tiny": 22,
    # One residual stream (conv_proj, class token, position embedding, every LayerNorm, the
    # head's input). Per encoder layer: MLP hidden 3072, heads (12), query/key dims within a
    # head (64, fibred over heads), value/output dims within a head (64, fibred): 4 x 12 = 48.
    # Total 49.
    "vit_b_16": 49,
    # Depths (alpha 0.5) 16, 8, 16, 24, 40, 48, 96, 160. Stem 16 tied through the first
    # depthwise conv: 1; its 1x1 projection to 8: 1; one stream per stack (6 stacks, repeats
    # joined by residuals): 6; one expanded set per block (3 + 3 + 3 + 2 + 4 + 1): 16; final
    # conv 1280: 1. Total 25.
    "mnasnet0_5": 25,
}

BUILD_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "vit_b_16": {"image_size": 64},
}

INPUT_SIZE = 64


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every floating state entry in place (running variances stay positive).

    Tensors of more than a million entries (VGG's classifier, ViT's MLPs) get a cheaper noise,
    the sum of one random vector per axis: still different along every axis, without drawing a
    random number per entry.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            if value.numel() <= 2**20:
                value.add_(0.1 * torch.randn(value.shape, generator=generator))
            else:
                for axis, size in enumerate(value.shape):
                    shape = [1] * value.dim()
                    shape[axis] = size
                    value.add_(0.1 * torch.randn(shape, generator=generator))
            if name.endswith("running_var"):
                value.abs_().add_(0.5)
    return model


class Zoo:
    """Builds each model once per module: perturbed model, example input, spec, warnings."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[nn.Module, torch.Tensor, PermutationSpec, list[str]]] = {}

    def __getitem__(self, name: str) -> tuple[nn.Module, torch.Tensor, PermutationSpec, list[str]]:
        if name not in self._cache:
            torch.manual_seed(0)
            model = getattr(torchvision.models, name)(num_classes=10, **BUILD_KWARGS.get(name, {}))
            perturb_(model.eval())
            example = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(1))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UnsupportedOpWarning)
                spec = infer_spec(model, example)
            unsupported = [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]
            self._cache[name] = (model, example, spec, unsupported)
        return self._cache[name]


@pytest.fixture(scope="module")
def zoo() -> Iterator[Zoo]:
    # Batch-1 64x64 inputs gain nothing from intra-op threads, and on a busy 2-core machine the
    # OpenMP barriers of a second thread can make a forward pass 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Zoo()
    torch.set_num_threads(threads)


def member(group: PermutationGroup, param: str, axis: int) -> Member:
    found = [m for m in group.members if m.param == param and m.axis == axis]
    assert len(found) == 1, f"{param} axis {axis} appears {len(found)} times in {group.name}"
    return found[0]


# ------------------------------------------------------------------------------ soundness
@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_random_permutation_preserves_outputs(zoo: Zoo, name: str) -> None:
    model, example, spec, unsupported = zoo[name]
    assert spec.tracer == "fx"
    assert unsupported == [], f"{name}: every op of the zoo should be understood"
    report = verify_spec(model, spec, example, seed=0)
    assert report.passed, f"{name}: max |diff| {report.max_abs_diff:.3g} (rel {report.max_rel_diff:.3g})"
    assert report.groups == len(spec.active_groups)
    # Every parameter named by an active group really moved.
    assert report.permuted_tensors == len(spec.members_by_param)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "googlenet", "resnext50_32x4d"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_permutation_preserves_outputs_other_seeds(zoo: Zoo, name: str, seed: int) -> None:
    model, example, spec, _ = zoo[name]
    report = verify_spec(model, spec, example, seed=seed)
    assert report.passed, f"{name} seed {seed}: max |diff| {report.max_abs_diff:.3g}"


# --------------------------------------------------------------------------- completeness
@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_group_count_matches_derivation(zoo: Zoo, name: str) -> None:
    spec = zoo[name][2]
    found = len(spec.active_groups)
    listing = ", ".join(f"{g.name}:{g.size}" for g in spec.active_groups)
    assert found == EXPECTED_GROUPS[name], f"{name}: {found} groups, derived {EXPECTED_GROUPS[name]}: {listing}"


def test_resnet50_stem_is_separate_from_layer1_stream(zoo: Zoo) -> None:
    spec = zoo["resnet50"][2]
    stem = only_group(spec, "conv1.weight", 0)
    stream = only_group(spec, "layer1.0.conv3.weight", 0)
    assert stem is not stream and stem.size == 64 and stream.size == 256
    assert stream is only_group(spec, "layer1.0.downsample.0.weight", 0)
    assert stream is only_group(spec, "layer1.2.conv3.weight", 0)
    assert stream is only_group(spec, "layer2.0.conv1.weight", 1)
    assert stem is only_group(spec, "layer1.0.downsample.0.weight", 1)
    assert "bn1.num_batches_tracked" not in spec.members_by_param


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_vgg_flatten_expands_last_conv_channels(zoo: Zoo, name: str) -> None:
    spec = zoo[name][2]
    last_conv = "features.18.weight" if name == "vgg11" else "features.25.weight"
    group = only_group(spec, last_conv, 0)
    assert group.size == 512
    flattened = member(group, "classifier.0.weight", 1)
    assert (flattened.inner, flattened.offset, flattened.outer) == (49, 0, ())
    hidden = [g for g in spec.active_groups if g.size == 4096]
    assert len(hidden) == 2
    assert group_of(spec, "classifier.6.weight", 0) == []  # logits are the output


def test_densenet_concatenation_is_block_structured(zoo: Zoo) -> None:
    spec = zoo["densenet121"][2]
    initial = only_group(spec, "features.conv0.weight", 0)
    first_new = only_group(spec, "features.denseblock1.denselayer1.conv2.weight", 0)
    assert (initial.size, first_new.size) == (64, 32)
    # denselayer3 reads cat(conv0, layer1, layer2): the parts sit at offsets 0, 64, 96.
    reader = "features.denseblock1.denselayer3.conv1.weight"
    assert member(initial, reader, 1).offset == 0
    assert member(first_new, reader, 1).offset == 64
    second_new = only_group(spec, "features.denseblock1.denselayer2.conv2.weight", 0)
    assert member(second_new, reader, 1).offset == 96
    # The BatchNorm in front of the transition sees all 256 channels, part by part.
    assert member(second_new, "features.transition1.norm.weight", 0).offset == 96


def test_squeezenet_fire_expands_are_concatenated_parts(zoo: Zoo) -> None:
    spec = zoo["squeezenet1_0"][2]
    expand1 = only_group(spec, "features.3.expand1x1.weight", 0)
    expand3 = only_group(spec, "features.3.expand3x3.weight", 0)
    assert expand1 is not expand3
    assert member(expand1, "features.4.squeeze.weight", 1).offset == 0
    assert member(expand3, "features.4.squeeze.weight", 1).offset == 64
    assert group_of(spec, "classifier.1.weight", 0) == []  # logits are the output


def test_mobilenet_v2_depthwise_ties_expansion(zoo: Zoo) -> None:
    spec = zoo["mobilenet_v2"][2]
    expanded = only_group(spec, "features.2.conv.0.0.weight", 0)
    assert expanded.size == 96
    assert expanded is only_group(spec, "features.2.conv.1.0.weight", 0)  # depthwise conv
    assert expanded is only_group(spec, "features.2.conv.2.weight", 1)  # projection input
    stream = only_group(spec, "features.2.conv.2.weight", 0)
    assert stream is only_group(spec, "features.3.conv.2.weight", 0)  # residual repeat


def test_mobilenet_v3_squeeze_excitation_gate(zoo: Zoo) -> None:
    spec = zoo["mobilenet_v3_small"][2]
    expanded = only_group(spec, "features.4.block.0.0.weight", 0)
    assert expanded is only_group(spec, "features.4.block.1.0.weight", 0)  # depthwise
    assert expanded is only_group(spec, "features.4.block.2.fc1.weight", 1)  # SE squeeze input
    assert expanded is only_group(spec, "features.4.block.2.fc2.weight", 0)  # SE gate
    assert expanded is only_group(spec, "features.4.block.3.0.weight", 1)  # projection input
    squeeze = only_group(spec, "features.4.block.2.fc1.weight", 0)
    assert squeeze.size == 24 and squeeze is only_group(spec, "features.4.block.2.fc2.weight", 1)


def test_resnext_grouped_conv_structure(zoo: Zoo) -> None:
    spec = zoo["resnext50_32x4d"][2]
    conv_groups = [g for g in group_of(spec, "layer1.0.conv2.weight", 0) if g.per is None]
    within_out = [g for g in group_of(spec, "layer1.0.conv2.weight", 0) if g.per is not None]
    assert [g.size for g in conv_groups] == [32]
    assert [g.size for g in within_out] == [4] and within_out[0].per == conv_groups[0].name
    within_in = only_group(spec, "layer1.0.conv2.weight", 1)
    assert within_in.size == 4 and within_in.per is None
    assert conv_groups[0] in group_of(spec, "layer1.0.conv1.weight", 0)


def test_shufflenet_channel_shuffle_stays_fixed(zoo: Zoo) -> None:
    spec = zoo["shufflenet_v2_x0_5"][2]
    for block in ("stage2.0", "stage2.1", "stage3.3", "stage4.3"):
        assert group_of(spec, f"{block}.branch2.5.weight", 0) == []
    assert group_of(spec, "stage2.0.branch1.2.weight", 0) == []
    mid = only_group(spec, "stage3.3.branch2.0.weight", 0)
    assert mid.size == 48 and mid is only_group(spec, "stage3.3.branch2.3.weight", 0)


def test_convnext_layer_scale_rides_the_stream(zoo: Zoo) -> None:
    spec = zoo["convnext_tiny"][2]
    stream = only_group(spec, "features.0.0.weight", 0)
    for param in ("features.1.0.layer_scale", "features.1.2.block.0.weight", "features.2.0.weight"):
        assert stream is only_group(spec, param, 0)
    assert stream is not only_group(spec, "features.2.1.weight", 0)


def test_vit_b_16_heads_and_fibred_head_dims(zoo: Zoo) -> None:
    spec = zoo["vit_b_16"][2]
    stream = only_group(spec, "conv_proj.weight", 0)
    assert member(stream, "class_token", 2).is_plain
    assert member(stream, "encoder.pos_embedding", 2).is_plain
    assert stream is only_group(spec, "heads.head.weight", 1)
    prefix = "encoder.layers.encoder_layer_3.self_attention"
    in_proj = group_of(spec, f"{prefix}.in_proj_weight", 0)
    heads = [g for g in in_proj if g.per is None]
    assert [g.size for g in heads] == [12]
    within = [g for g in in_proj if g.per is not None]
    assert sorted(g.size for g in within) == [64, 64] and {g.per for g in within} == {heads[0].name}
    value_dims = [g for g in group_of(spec, f"{prefix}.out_proj.weight", 1) if g.per is not None]
    assert len(value_dims) == 1 and member(value_dims[0], f"{prefix}.in_proj_weight", 0).offset == 1536


def test_vit_b_16_planted_recovery_is_exact():
    """A deep transformer: heads, per-head dims, MLPs and the stream recovered exactly (12 layers)."""
    from tests.conftest import perturb_

    model = perturb_(torchvision.models.vit_b_16(num_classes=10).eval(), scale=0.02)
    spec = autoperm.infer_spec(model, torch.randn(1, 3, 224, 224))
    state = model.state_dict()
    planted = autoperm.random_permutation(spec, seed=3)
    permuted = autoperm.apply_permutation(spec, planted, state)
    result = autoperm.weight_matching(spec, state, permuted)
    recovered = autoperm.apply_permutation(spec, result.perms, permuted)
    assert all(torch.equal(recovered[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
                                  "resnext50_32x4d", "regnet_y_400mf", "squeezenet1_0", "googlenet"])
def test_planted_recovery_is_exact(name):
    """Weight matching returns a planted permutation of a zoo model exactly (BN statistics included)."""
    from tests.conftest import perturb_

    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = perturb_(getattr(torchvision.models, name)(num_classes=10, **kwargs).eval(), scale=0.05)
    spec = autoperm.infer_spec(model, torch.randn(1, 3, 64, 64))
    state = model.state_dict()
    permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=5), state)
    result = autoperm.weight_matching(spec, state, permuted)
    recovered = autoperm.apply_permutation(spec, result.perms, permuted)
    assert all(torch.equal(recovered[k], state[k]) for k in state)
