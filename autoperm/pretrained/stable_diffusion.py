"""The UNet of an LDM single-file Stable Diffusion checkpoint, as a diffusers model.

Nothing is downloaded and no key table is kept here: the UNet's hyper-parameters are read from
its tensors into the parameters of the original LDM config (``model_channels``,
``channel_mult``, ``num_res_blocks``, ``attention_resolutions``, ``transformer_depth``,
``context_dim``, ...), diffusers' own ``create_unet_diffusers_config_from_ldm`` turns them into
a ``UNet2DConditionModel`` config, and diffusers' own ``convert_ldm_unet_checkpoint`` gives the
names: it is run on a copy of the file's names whose values are numbered tags, so each tag's
new name says which stored tensor becomes which diffusers parameter.

The attention heads are not in the weights; they follow the published layouts as diffusers
converts them: 8 heads per attention in SD 1.x, heads of 64 channels in SD 2.x and SDXL.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoperm.errors import CheckpointError, ModelLoadError
from autoperm.io.stable_diffusion import UNET_PREFIX
from autoperm.pretrained.directory import ModelDirectory

__all__ = ["StableDiffusionUNet", "ldm_unet_params", "read_ldm_unet"]

logger = logging.getLogger(__name__)

SD1_HEADS = 8
"""Attention heads per transformer in SD 1.x (LDM ``num_heads: 8``)."""
HEAD_CHANNELS = 64
"""Channels per attention head in SD 2.x and SDXL (LDM ``num_head_channels: 64``)."""
SDXL_TIME_EMBED_DIM = 256
"""Width of each size/crop embedding SDXL adds to the pooled text embedding (diffusers' value)."""
_VAE_CHANNEL_MULT = [1, 2, 4, 4]
"""The SD VAE's levels; they only set the default sample size of the config (latent scale 8)."""


@dataclass(frozen=True)
class StableDiffusionUNet:
    """The UNet of an LDM single file, as diffusers sees it.

    Attributes:
        family: ``"SD 1.x"``, ``"SD 2.x"`` or ``"SDXL"`` (the layout the tensors have).
        config: the ``UNet2DConditionModel`` config (as diffusers' conversion creates it).
        names: ``{stored name: diffusers name}`` for every UNet tensor of the file.
        source: the file it was read from.
    """

    family: str
    config: dict[str, Any] = field(repr=False)
    names: dict[str, str] = field(repr=False)
    source: Path

    @property
    def directory(self) -> ModelDirectory:
        """The UNet described as a diffusers model directory (for default inputs and specs)."""
        return ModelDirectory(self.source, "diffusers", "UNet2DConditionModel", self.config)

    def build(self, device: str | torch.device = "meta") -> nn.Module:
        """A ``UNet2DConditionModel`` of this config on ``device`` (``meta``: no weights allocated).

        Raises:
            ModelLoadError: diffusers is missing or rejects the config.
        """
        diffusers = _diffusers()
        try:
            with torch.device(device):
                model = diffusers.UNet2DConditionModel.from_config(self.config)
        except Exception as error:  # a config diffusers rejects can raise anything
            raise ModelLoadError(
                f"cannot build the {self.family} UNet of {str(self.source)!r} in diffusers: {type(error).__name__}: {error}"
            ) from error
        return model.eval()

    def rename(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{diffusers name: tensor}`` for the UNet tensors of ``tensors`` (same objects, no copy)."""
        return {self.names[name]: tensor for name, tensor in tensors.items() if name in self.names}


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ModelLoadError("Stable Diffusion checkpoints need diffusers; install it with: pip install diffusers") from None
    return diffusers


def ldm_unet_params(unet: Mapping[str, torch.Tensor], where: str) -> tuple[str, dict[str, Any]]:
    """The LDM ``unet_config.params`` of a UNet, read from its tensors.

    Args:
        unet: the UNet's tensors under their stored names (``model.diffusion_model.*``); only
            shapes are read.
        where: the file, for messages.

    Returns:
        ``(family, params)``: the layout (``"SD 1.x"``, ``"SD 2.x"``, ``"SDXL"``) and the
        parameters as the original LDM config spells them.

    Raises:
        CheckpointError: the tensors are not a UNet in the LDM layout (a layout of another
            model under ``model.diffusion_model.``), naming what is missing.
    """
    shapes = {name[len(UNET_PREFIX):]: tuple(tensor.shape) for name, tensor in unet.items()}
    required = ["input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight", "middle_block.0.in_layers.2.weight"]
    absent = [name for name in required if name not in shapes]
    if absent:
        raise CheckpointError(
            f"{where!r} is a single file of an unknown layout: its {UNET_PREFIX}* tensors are not an SD 1.x / 2.x / "
            f"SDXL UNet (no {UNET_PREFIX}{absent[0]}; it has e.g. {sorted(shapes)[:3]})"
        )
    blocks = sorted({int(name.split(".")[1]) for name in shapes if name.startswith("input_blocks.")})
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in shapes]
    levels = len(downsamplers) + 1
    res_blocks, remainder = divmod(len(blocks) - 1 - len(downsamplers), levels)
    if remainder or res_blocks < 1 or blocks != list(range(len(blocks))):
        raise CheckpointError(
            f"{where!r} is a single file of an unknown layout: its {len(blocks)} UNet input blocks do not split into "
            f"{levels} levels of equal depth"
        )
    model_channels = shapes["input_blocks.0.0.weight"][0]
    channel_mult, attention_levels, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (res_blocks + 1)
        width = shapes.get(f"input_blocks.{first}.0.out_layers.3.weight", (0,))[0]
        if width % model_channels or width == 0:
            raise CheckpointError(
                f"{where!r}: UNet input block {first} has {width} channels, not a multiple of the {model_channels} "
                "of the first convolution, as the LDM layout requires"
            )
        channel_mult.append(width // model_channels)
        prefixes = tuple(f"input_blocks.{first + j}.1.transformer_blocks." for j in range(res_blocks))
        layers = {int(name[len(p):].split(".")[0]) for name in shapes for p in prefixes if name.startswith(p)}
        if layers:
            attention_levels.append(level)
        depths.append(max(layers) + 1 if layers else 0)
    to_k = next((shape for name, shape in shapes.items() if name.endswith("attn2.to_k.weight")), None)
    proj_in = next((shape for name, shape in shapes.items() if name.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise CheckpointError(f"{where!r} is a single file of an unknown layout: its UNet has no cross-attention")
    linear = len(proj_in) == 2
    sdxl = "label_emb.0.0.weight" in shapes
    family = "SDXL" if sdxl else "SD 2.x" if linear else "SD 1.x"
    attention_depths = {depths[level] for level in attention_levels}
    params: dict[str, Any] = {
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "model_channels": model_channels,
        "channel_mult": channel_mult,
        "num_res_blocks": res_blocks,
        "attention_resolutions": [2**level for level in attention_levels],
        "transformer_depth": attention_depths.pop() if len(attention_depths) == 1 else depths,
        "context_dim": to_k[1],
        "use_linear_in_transformer": linear,
    }
    if family == "SD 1.x":
        params["num_heads"] = SD1_HEADS
    else:
        params["num_head_channels"] = HEAD_CHANNELS
        narrow = [model_channels * channel_mult[level] for level in attention_levels if (model_channels * channel_mult[level]) % HEAD_CHANNELS]
        if narrow:
            raise CheckpointError(
                f"{where!r}: a {family} UNet has attention heads of {HEAD_CHANNELS} channels, but an attention level "
                f"has {narrow[0]} channels"
            )
    if sdxl:
        params["num_classes"] = "sequential"
        params["adm_in_channels"] = shapes["label_emb.0.0.weight"][1]
    return family, params


def read_ldm_unet(tensors: Mapping[str, torch.Tensor], where: str | Path) -> StableDiffusionUNet:
    """The diffusers config and names of the UNet in an LDM single file.

    Args:
        tensors: every tensor of the file under its stored name (only shapes are read; the
            other components tell SDXL's conditioning apart).
        where: the file, for messages.

    Returns:
        The UNet's family, config and ``{stored name: diffusers name}``.

    Raises:
        CheckpointError: the UNet is not in a layout diffusers converts, or the conversion is
            not a pure renaming of exactly the model's parameters (names what differs).
        ModelLoadError: diffusers is missing.
    """
    _diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    where = str(where)
    unet = {name: tensor for name, tensor in tensors.items() if name.startswith(UNET_PREFIX)}
    family, params = ldm_unet_params(unet, where)
    original = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": _VAE_CHANNEL_MULT}}},
    }}}
    try:
        config = create_unet_diffusers_config_from_ldm(original, tensors)
    except Exception as error:  # diffusers' helper asserts and indexes freely
        raise CheckpointError(
            f"{where!r}: diffusers cannot make a UNet config of this {family} layout: {type(error).__name__}: {error}"
        ) from error
    if family == "SDXL" and any(name.startswith("conditioner.") for name in tensors):
        # diffusers keys SDXL on the full context width (2048 or 1280); narrower SDXL-layout UNets
        # with SDXL's conditioner are SDXL too: pooled text and size/crop ids, not class labels
        config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM)
    tags = {name: torch.tensor(index) for index, name in enumerate(unet)}
    stored_by_tag = {id(tag): name for name, tag in tags.items()}
    names: dict[str, str] = {}
    for new_name, value in convert_ldm_unet_checkpoint(tags, config).items():
        old_name = stored_by_tag.get(id(value))
        if value is None:
            raise CheckpointError(f"{where!r}: diffusers' conversion looks for a stored tensor for {new_name!r} that the file lacks")
        if old_name is None:
            raise CheckpointError(
                f"{where!r}: diffusers' conversion makes {new_name!r} by reshaping or combining stored tensors, "
                "which autoperm cannot map back; the file is of a layout autoperm does not know"
            )
        if old_name in names:
            raise CheckpointError(f"{where!r}: diffusers' conversion copies {old_name!r} into two parameters")
        names[old_name] = new_name
    return _checked(StableDiffusionUNet(family, config, names, Path(where)), unet, where)


def _checked(result: StableDiffusionUNet, unet: Mapping[str, torch.Tensor], where: str) -> StableDiffusionUNet:
    """Check that the names cover the file's UNet and the model's parameters exactly, shapes equal."""
    unmapped = [name for name in unet if name not in result.names]
    expected = result.build("meta").state_dict()
    renamed = result.rename(unet)
    missing = [name for name in expected if name not in renamed]
    unexpected = [name for name in renamed if name not in expected]
    if unmapped or missing or unexpected:
        raise CheckpointError(
            f"{where!r}: the {result.family} UNet does not convert to diffusers exactly: stored tensors no parameter "
            f"takes {unmapped[:3]}, parameters missing {missing[:3]} ({len(missing)} in all), unexpected "
            f"{unexpected[:3]}; the file is of a layout autoperm does not know"
        )
    reshaped = [name for name, tensor in renamed.items() if tuple(tensor.shape) != tuple(expected[name].shape)]
    if reshaped:
        name = reshaped[0]
        raise CheckpointError(
            f"{where!r}: {name!r} is stored with shape {list(renamed[name].shape)} but the {result.family} UNet has "
            f"{list(expected[name].shape)} ({len(reshaped)} such tensor(s)); the file is of a layout autoperm does not know"
        )
    logger.info("%s: %s UNet, %d tensors renamed by diffusers' conversion", where, result.family, len(result.names))
    return result
