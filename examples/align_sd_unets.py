"""Align two Stable Diffusion UNets kept as diffusers directories, without a hand-written spec.

Given two UNet directories (the ``unet/`` folder of a diffusers pipeline, or any
``UNet2DConditionModel.save_pretrained`` output), runs ``autoperm match A B -o OUT``: the
permutation groups (GroupNorm groups and the channel permutations inside them, attention heads,
residual and skip connections) are inferred from the model itself, and OUT is B permuted to
align with A, written as a diffusers directory in B's layout:

    python examples/align_sd_unets.py --a ./sd15/unet --b ./other-finetune/unet --out ./other-unet-aligned

Without ``--a``/``--b`` it creates two small UNets locally (no download): A, and B = A with its
channels reordered and some noise added (a stand-in for a model trained from another seed). It
reports the L2 distance before and after alignment and checks that the aligned B computes B's
function.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, help="Reference UNet directory (default: create one).")
    parser.add_argument("--b", type=Path, help="UNet directory to align to A (default: create one).")
    parser.add_argument("--out", type=Path, help="Aligned B (default: WORKDIR/b-aligned).")
    parser.add_argument("--workdir", type=Path, default=Path("unet-align-demo"), help="Where created UNets go.")
    parser.add_argument("--max-iter", type=int, default=100, help="Most weight-matching sweeps.")
    parser.add_argument("--check-function", action="store_true",
                        help="Also run B and the aligned B on one latent (default only for created UNets).")
    return parser


def _unet_config() -> dict:
    return dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=1,
                sample_size=16, attention_head_dim=8, norm_num_groups=8)


def create_unets(workdir: Path) -> tuple[Path, Path]:
    import diffusers

    import autoperm

    diffusers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**_unet_config())
    paths = workdir / "unet-a", workdir / "unet-b"
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(paths[0], max_shard_size="500KB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = autoperm.infer_spec(model, _inputs(model.config))
    permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=1), model.state_dict())
    generator = torch.Generator().manual_seed(2)
    model.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in permuted.items()})
    model.save_pretrained(paths[1], max_shard_size="500KB")
    return paths


def _inputs(config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    size = 2 ** len(config.block_out_channels) * 4
    return {
        "sample": torch.randn(1, config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor([50.0]),
        "encoder_hidden_states": torch.randn(1, 8, config.cross_attention_dim, generator=generator),
    }


def function_difference(path_b: Path, path_aligned: Path) -> float:
    """Largest relative output difference between B and the aligned B on one latent."""
    import diffusers

    b = diffusers.UNet2DConditionModel.from_pretrained(path_b).eval()
    aligned = diffusers.UNet2DConditionModel.from_pretrained(path_aligned).eval()
    inputs = _inputs(b.config)
    with torch.no_grad():
        out_b, out_aligned = b(**inputs).sample, aligned(**inputs).sample
    return ((out_b - out_aligned).abs().max() / out_b.abs().max()).item()


def main(argv: list[str] | None = None) -> None:
    import autoperm

    args = build_parser().parse_args(argv)
    if (args.a is None) != (args.b is None):
        sys.exit("give both --a and --b, or neither")
    created = args.a is None
    path_a, path_b = create_unets(args.workdir) if created else (args.a, args.b)
    out = args.out or args.workdir / "b-aligned"
    if out.exists():
        sys.exit(f"{out} exists; remove it or give --out")
    command = [sys.executable, "-m", "autoperm", "match", str(path_a), str(path_b), "-o", str(out),
               "--max-iter", str(args.max_iter)]
    print("$", " ".join(["python", "-m", "autoperm", *command[3:]]))
    subprocess.run(command, check=True)
    sd_a = autoperm.load_state_dict(path_a)
    before = autoperm.l2_distance(sd_a, autoperm.load_state_dict(path_b))
    after = autoperm.l2_distance(sd_a, autoperm.load_state_dict(out))
    print(f"L2 distance to A: B {before.absolute:.4g}, aligned B {after.absolute:.4g} ({before.relative:.3f} -> {after.relative:.3f} relative)")
    if created or args.check_function:
        print(f"aligned B vs B, largest relative output difference: {function_difference(path_b, out):.2e}")


if __name__ == "__main__":
    main()
