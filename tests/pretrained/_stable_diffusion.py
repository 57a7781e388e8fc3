"""Tiny Stable Diffusion checkpoints made locally: LDM single files and diffusers pipeline folders.

The LDM names are written here by the original layout's rules (input, middle and output blocks),
independently of diffusers' conversion, so the tests compare autoperm's names with a reference
of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

diffusers = __import__("pytest").importorskip("diffusers")

# norm_num_groups stays at SD's 32 and attention heads follow SD's rules (8 heads in SD 1.x,
# heads of 64 channels in SD 2.x and SDXL), since the single-file layout does not store them
CONFIGS: dict[str, dict] = {
    "SD 1.x": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, layers_per_block=1,
                   attention_head_dim=8, sample_size=8),
    "SD 2.x": dict(block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24, layers_per_block=1,
                   attention_head_dim=(1, 2), use_linear_projection=True, sample_size=8),
    "SDXL": dict(block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24, layers_per_block=2,
                 attention_head_dim=(1, 2), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=16 + 6 * 256, sample_size=8),
}

OTHER_COMPONENTS: dict[str, dict[str, tuple[int, ...]]] = {
    "SD 1.x": {"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3), "first_stage_model.quant_conv.bias": (8,),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 24)},
    "SD 2.x": {"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
               "cond_stage_model.model.token_embedding.weight": (10, 24)},
    "SDXL": {"first_stage_model.decoder.conv_out.bias": (3,),
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (10, 12),
             "conditioner.embedders.1.model.text_projection": (12, 16)},
}

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def tiny_unet(family: str, seed: int = 0) -> "diffusers.UNet2DConditionModel":
    """A small UNet in the block layout of ``family``, with random weights."""
    diffusers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**CONFIGS[family]).eval()


def ldm_name(name: str, state_dict: dict[str, torch.Tensor], layers: int) -> str:
    """The LDM name (``model.diffusion_model.*``) of a diffusers UNet parameter."""
    module, _, leaf = name.rpartition(".")
    if module in _FIXED:
        return f"model.diffusion_model.{_FIXED[module]}.{leaf}"
    parts = name.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET[rest[0]], *rest[1:]])

    if parts[0] == "down_blocks":
        block = int(parts[1])
        if parts[2] == "downsamplers":
            inner = f"input_blocks.{(layers + 1) * (block + 1)}.0.op.{leaf}"
        else:
            index = (layers + 1) * block + int(parts[3]) + 1
            inner = f"input_blocks.{index}.0.{resnet(parts[4:])}" if parts[2] == "resnets" else \
                f"input_blocks.{index}.1.{'.'.join(parts[4:])}"
    elif parts[0] == "mid_block":
        inner = f"middle_block.{2 * int(parts[2])}.{resnet(parts[3:])}" if parts[1] == "resnets" else \
            f"middle_block.1.{'.'.join(parts[3:])}"
    else:
        block = int(parts[1])
        if parts[2] == "upsamplers":
            attention = any(key.startswith(f"up_blocks.{block}.attentions.") for key in state_dict)
            inner = f"output_blocks.{(layers + 1) * block + layers}.{2 if attention else 1}.conv.{leaf}"
        else:
            index = (layers + 1) * block + int(parts[3])
            inner = f"output_blocks.{index}.0.{resnet(parts[4:])}" if parts[2] == "resnets" else \
                f"output_blocks.{index}.1.{'.'.join(parts[4:])}"
    return f"model.diffusion_model.{inner}"


def ldm_state_dict(family: str, unet_state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A whole LDM checkpoint: the UNet under LDM names, then a few VAE and text-encoder tensors."""
    layers = CONFIGS[family]["layers_per_block"]
    tensors = {ldm_name(k, unet_state_dict, layers): v.to(dtype) for k, v in unet_state_dict.items()}
    generator = torch.Generator().manual_seed(7)
    for name, shape in OTHER_COMPONENTS[family].items():
        tensors[name] = torch.randn(shape, generator=generator).to(dtype)
    return tensors


def write_ldm_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an LDM single file: safetensors with metadata, or a ``.ckpt`` with ``state_dict`` and ``global_step``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"modelspec.title": "tiny"})
    else:
        torch.save({"state_dict": tensors, "global_step": 7}, path)
    return path


def write_pipeline(path: Path, unet: "diffusers.UNet2DConditionModel", dtype: torch.dtype) -> Path:
    """A minimal diffusers pipeline folder: model_index.json, unet/ (sharded), vae/, text_encoder/, scheduler/."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    unet.to(dtype).save_pretrained(path / "unet", max_shard_size="200KB")
    unet.float()
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8)
    vae.save_pretrained(path / "vae")
    (path / "text_encoder").mkdir()
    (path / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"]}))
    save_file({"text_model.embeddings.token_embedding.weight": torch.randn(10, 24)}, str(path / "text_encoder" / "model.safetensors"))
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def unet_inputs(family: str, seed: int = 3) -> dict:
    """One latent, timestep and text conditioning that fit the tiny UNet of ``family``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"sample": torch.randn(1, 4, 8, 8, generator=generator), "timestep": torch.tensor([10.0]),
              "encoder_hidden_states": torch.randn(1, 5, 24, generator=generator)}
    if family == "SDXL":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 16, generator=generator),
                                       "time_ids": torch.randn(1, 6, generator=generator)}
    return inputs
