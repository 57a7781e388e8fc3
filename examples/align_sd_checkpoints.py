"""Align Stable Diffusion checkpoints as the community keeps them: single files and pipeline folders.

`autoperm match A B -o OUT` takes two LDM single files (``.safetensors`` / ``.ckpt`` of SD 1.x,
SD 2.x or SDXL, with ``model.diffusion_model.*`` for the UNet) or two diffusers pipeline folders
(``model_index.json``). Only the UNet is aligned; the VAE and text encoders share no permutation
with it and are copied unchanged. OUT has B's layout and dtypes, ready for a merging tool:

    python examples/align_sd_checkpoints.py --a sd15.safetensors --b other.safetensors --out other-aligned.safetensors
    python examples/align_sd_checkpoints.py --a ./sd15-pipeline --b ./other-pipeline --out ./other-aligned

Without ``--a``/``--b`` it creates a small SD 1.x-layout model locally (no download), saved both
as an LDM single file and as a pipeline folder, and B = A with its channels reordered and noise
added; it aligns both kinds and reports the UNet's L2 distance to A before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, help="Reference: an LDM single file or a pipeline folder (default: create).")
    parser.add_argument("--b", type=Path, help="Checkpoint to align to A, of the same kind (default: create).")
    parser.add_argument("--out", type=Path, help="Aligned B (required with --a/--b).")
    parser.add_argument("--workdir", type=Path, default=Path("sd-align-demo"), help="Where created checkpoints go.")
    parser.add_argument("--max-iter", type=int, default=100, help="Most weight-matching sweeps.")
    return parser


def _ldm_name(name: str, layers: int, up_with_attention: set[int]) -> str:
    """The original LDM name of a diffusers UNet parameter (SD 1.x / 2.x block layout), for the demo files."""
    module, _, leaf = name.rpartition(".")
    if module in _FIXED:
        return f"model.diffusion_model.{_FIXED[module]}.{leaf}"
    part = name.split(".")
    resnet = ".".join([_RESNET.get(part[4] if part[0] != "mid_block" else part[3], ""), leaf])
    if part[0] == "mid_block":
        inner = f"middle_block.{2 * int(part[2])}.{resnet}" if part[1] == "resnets" else f"middle_block.1.{'.'.join(part[3:])}"
    elif part[2] in ("downsamplers", "upsamplers"):
        block = int(part[1])
        inner = f"input_blocks.{(layers + 1) * (block + 1)}.0.op.{leaf}" if part[0] == "down_blocks" else \
            f"output_blocks.{(layers + 1) * block + layers}.{2 if block in up_with_attention else 1}.conv.{leaf}"
    else:
        index = (layers + 1) * int(part[1]) + int(part[3]) + (part[0] == "down_blocks")
        prefix = "input_blocks" if part[0] == "down_blocks" else "output_blocks"
        inner = f"{prefix}.{index}.0.{resnet}" if part[2] == "resnets" else f"{prefix}.{index}.1.{'.'.join(part[4:])}"
    return f"model.diffusion_model.{inner}"


def create_checkpoints(workdir: Path) -> dict[str, tuple[Path, Path]]:
    """A and B as LDM single files and as pipeline folders (UNet, VAE, a stand-in text encoder)."""
    import diffusers
    from safetensors.torch import save_file

    import autoperm

    diffusers.logging.set_verbosity_error()
    shutil.rmtree(workdir, ignore_errors=True)
    torch.manual_seed(0)
    config = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=1,
                  attention_head_dim=8, sample_size=16)
    unet = diffusers.UNet2DConditionModel(**config)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    text = {"text_model.embeddings.token_embedding.weight": torch.randn(100, 32)}
    inputs = {"sample": torch.randn(1, 4, 16, 16), "timestep": torch.tensor([50.0]),
              "encoder_hidden_states": torch.randn(1, 8, 32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = autoperm.infer_spec(unet, inputs)
    sd_a = unet.state_dict()
    permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=1), sd_a)
    generator = torch.Generator().manual_seed(2)
    sd_b = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in permuted.items()}
    up_with_attention = {i for i, kind in enumerate(config["up_block_types"]) if kind.startswith("CrossAttn")}
    paths: dict[str, tuple[Path, Path]] = {"single file": (workdir / "a.safetensors", workdir / "b.safetensors"),
                                           "pipeline": (workdir / "pipeline-a", workdir / "pipeline-b")}
    workdir.mkdir(parents=True)
    for state_dict, file, folder in zip((sd_a, sd_b), paths["single file"], paths["pipeline"]):
        tensors = {_ldm_name(k, config["layers_per_block"], up_with_attention): v.half() for k, v in state_dict.items()}
        tensors.update({f"first_stage_model.{k}": v.half() for k, v in vae.state_dict().items()})
        tensors.update({f"cond_stage_model.transformer.{k}": v.half() for k, v in text.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
        unet.load_state_dict(state_dict)
        unet.half().save_pretrained(folder / "unet")
        unet.float()
        vae.save_pretrained(folder / "vae")
        (folder / "text_encoder").mkdir()
        save_file(text, str(folder / "text_encoder" / "model.safetensors"))
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return paths


def unet_distance(path_a: Path, path_b: Path) -> float:
    """Relative L2 distance between the UNets of two single files or pipeline folders."""
    import autoperm

    def unet(path: Path) -> dict[str, torch.Tensor]:
        if path.is_dir():
            return autoperm.load_state_dict(path / "unet")
        return {k: v for k, v in autoperm.load_state_dict(path).items() if k.startswith("model.diffusion_model.")}

    return autoperm.l2_distance(unet(path_a), unet(path_b)).relative


def align(path_a: Path, path_b: Path, out: Path, max_iter: int) -> None:
    """Run `autoperm match A B -o OUT` and report the UNet's distance to A before and after."""
    command = [sys.executable, "-m", "autoperm", "match", str(path_a), str(path_b), "-o", str(out),
               "--max-iter", str(max_iter)]
    print("$", " ".join(["autoperm", *command[3:]]))
    subprocess.run(command, check=True)
    print(f"UNet relative L2 distance to A: B {unet_distance(path_a, path_b):.3f}, aligned B {unet_distance(path_a, out):.3f}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.a is None) != (args.b is None) or (args.a is not None and args.out is None):
        sys.exit("give --a, --b and --out, or none of them")
    if args.a is not None:
        align(args.a, args.b, args.out, args.max_iter)
        return
    for kind, (path_a, path_b) in create_checkpoints(args.workdir).items():
        print(f"# {kind}")
        out = args.workdir / (f"b-aligned{path_b.suffix}" if path_b.suffix else "pipeline-b-aligned")
        align(path_a, path_b, out, args.max_iter)


if __name__ == "__main__":
    main()
