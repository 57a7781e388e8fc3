"""Time and peak memory of `autoperm match` on model directories at real sizes, through the CLI.

Creates, under ``--workdir`` (kept between runs), a pair of directories per shape, dtype and
pair kind, as ``save_pretrained`` leaves them (``config.json`` and one safetensors file, which
is how Qwen2-0.5B, TinyLlama-1.1B and the diffusers UNets are published): ``a`` (random
weights: normal(0, 0.02), norms at one, biases at zero, seeded per tensor), and ``planted`` (an
exact random permutation of ``a`` from the spec the CLI infers) or ``independent`` (a second
seed). The models are never built in memory: the config builds them on the meta device and
every tensor is written on its own (:func:`autoperm.io.write_safetensors`).

Each ``autoperm match A B -o OUT --quiet`` runs in its own child process; the script records
its wall time and peak resident memory (``ru_maxrss`` from ``wait4``, which counts the pages of
the memory-mapped inputs it read), the RSS of a child that only imports torch and autoperm
(the base, measured in the same run), ``/proc/loadavg`` before the run, and for a planted pair
whether OUT holds A's tensors exactly.

    python benchmarks/bench_cli_sizes.py --workdir ./cli-sizes --shapes qwen2-0.5b --dtypes bfloat16
    python benchmarks/bench_cli_sizes.py --workdir ./cli-sizes --shapes sd15-unet,tinyllama-1.1b \\
        --dtypes float16,bfloat16,float32 --pairs planted,independent
    python benchmarks/bench_cli_sizes.py --workdir ./cli-sizes --shapes tiny-llama,tiny-unet   # seconds
    python benchmarks/bench_cli_sizes.py --workdir ./cli-sizes --shapes sd15-unet --dtypes float16 --layout single-file

Disk: each pair takes twice the weights plus the output (SDXL UNet in float16: about 15 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPOSITORY = Path(__file__).resolve().parent.parent

LLAMA = dict(architecture="LlamaForCausalLM", model_type="llama", max_position_embeddings=2048)
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2-0.5B: hidden 896, 24 layers, 14 query / 2 key-value heads of 64, MLP 4864, tied embeddings
    "qwen2-0.5b": dict(architecture="Qwen2ForCausalLM", model_type="qwen2", hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, tie_word_embeddings=True),
    # TinyLlama-1.1B: hidden 2048, 22 layers, 32 query / 4 key-value heads, MLP 5632, untied
    "tinyllama-1.1b": dict(**LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "tiny-llama": dict(**LLAMA, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    # diffusers' UNet2DConditionModel defaults are the SD 1.x layout; SD 1.5 conditions on 768-wide CLIP states
    "sd15-unet": dict(class_name="UNet2DConditionModel", cross_attention_dim=768, sample_size=64),
    # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "sdxl-unet": dict(class_name="UNet2DConditionModel", sample_size=128, block_out_channels=[320, 640, 1280],
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                      cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                      addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816),
    "tiny-unet": dict(class_name="UNet2DConditionModel", sample_size=16, block_out_channels=[32, 64],
                      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                      attention_head_dim=8, layers_per_block=1),  # SD's 32 norm groups: single files do not store them
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_config(shape: str, directory: Path) -> str:
    """Write ``config.json`` for ``shape``; returns the weights file name the library uses."""
    settings = dict(SHAPES[shape])
    directory.mkdir(parents=True, exist_ok=True)
    if "class_name" in settings:
        from diffusers import UNet2DConditionModel

        settings.pop("class_name")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                model = UNet2DConditionModel.from_config(settings)
        model.save_config(directory)
        return "diffusion_pytorch_model.safetensors"
    import transformers

    architecture, model_type = settings.pop("architecture"), settings.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **settings)
    config.architectures = [architecture]
    config.save_pretrained(directory)
    return "model.safetensors"


def meta_model_and_spec(directory: Path, workdir: Path):
    """The model on the meta device and the spec `autoperm spec` infers for ``directory``."""
    from autoperm import PermutationSpec
    from autoperm.pretrained import build_from_directory, read_model_directory

    spec_path = workdir / "spec.yaml"
    if not spec_path.exists():
        subprocess.run([sys.executable, "-m", "autoperm", "spec", str(directory), "-o", str(spec_path)],
                       check=True, cwd=REPOSITORY, env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_from_directory(read_model_directory(directory))
    return model, PermutationSpec.from_yaml(spec_path)


def stored_layout(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, tuple[list[int], torch.dtype]]:
    """``{name: (shape, dtype)}`` of the tensors ``save_pretrained`` stores: one name per tied group."""
    from autoperm.pretrained import tied_names

    dropped = {name for group in tied_names(model) for name in group[1:]}
    return {name: (list(t.shape), dtype if t.is_floating_point() else t.dtype)
            for name, t in model.state_dict().items() if name not in dropped}


def initial(name: str, shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal(0, 0.02) matrices and kernels, norms at one, biases at zero; seeded per tensor."""
    if len(shape) < 2:
        return (torch.ones if "norm" in name and name.endswith("weight") else torch.zeros)(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
    return (0.02 * torch.randn(shape, generator=generator)).to(dtype)


def create_pair(shape: str, dtype: str, pair: str, workdir: Path) -> tuple[Path, Path]:
    """Write the directories ``a`` and ``b`` of one pair under ``workdir`` unless they exist."""
    import autoperm
    from autoperm.io import mmap_safetensors, write_safetensors
    from autoperm.spec import permute_tensor

    a, b = workdir / "a", workdir / "b"
    if (a / "config.json").exists() and (b / "config.json").exists():
        return a, b
    shutil.rmtree(workdir, ignore_errors=True)
    weights = write_config(shape, a)
    model, spec = meta_model_and_spec(a, workdir)
    layout = stored_layout(model, DTYPES[dtype])
    metadata = {"format": "pt"}
    write_safetensors(a / weights, layout, lambda name: initial(name, layout[name][0], layout[name][1], seed=0), metadata)
    shutil.copy(a / "config.json", workdir / "config.json")
    b.mkdir()
    shutil.copy(a / "config.json", b / "config.json")
    if pair == "planted":
        source = mmap_safetensors(a / weights)
        perms = autoperm.random_permutation(spec, seed=123)
        members = spec.members_by_param

        def produce(name: str) -> torch.Tensor:
            return permute_tensor(spec, perms, name, source[name]) if name in members else source[name]

        write_safetensors(b / weights, layout, produce, metadata)
    else:
        write_safetensors(b / weights, layout, lambda name: initial(name, layout[name][0], layout[name][1], seed=1),
                          metadata)
    return a, b


FILLERS: dict[str, dict[str, int]] = {
    # parameters of the components an LDM single file carries besides the UNet (VAE, text encoders)
    "sd15-unet": {"first_stage_model.": 83_653_863, "cond_stage_model.transformer.": 123_060_480},
    "sdxl-unet": {"first_stage_model.": 83_653_863, "conditioner.embedders.0.transformer.": 123_060_480,
                  "conditioner.embedders.1.model.": 694_659_841},
    "tiny-unet": {"first_stage_model.": 5_000, "cond_stage_model.transformer.": 7_000},
}
"""Single files (``--layout single-file``) get random tensors of these sizes under these prefixes, so
that reading and copying them costs what it costs in a real checkpoint."""


def create_single_files(shape: str, a: Path, b: Path, workdir: Path) -> tuple[Path, Path]:
    """The pair's UNets as LDM single files (``model.diffusion_model.*`` plus VAE and text-encoder
    tensors of the real sizes, the same in both), written once next to the directories.

    The LDM names come from the tests' own rules for the original layout
    (``tests/pretrained/_stable_diffusion.py``), not from the conversion the CLI uses.
    """
    from autoperm.io import mmap_safetensors, write_safetensors

    sys.path.insert(0, str(REPOSITORY))
    from tests.pretrained._stable_diffusion import ldm_name

    layers = json.loads((a / "config.json").read_text()).get("layers_per_block", 2)
    files = []
    for directory in (a, b):
        path = workdir / f"{directory.name}.safetensors"
        files.append(path)
        if path.exists():
            continue
        source = mmap_safetensors(directory / "diffusion_pytorch_model.safetensors")
        names = {ldm_name(name, source, layers): name for name in source}
        dtype = next(iter(source.values())).dtype
        layout = {ldm: (list(source[name].shape), dtype) for ldm, name in names.items()}
        for prefix, count in FILLERS[shape].items():
            rows, rest = divmod(count, 4096)
            layout.update({f"{prefix}filler.{i}.weight": ([4096, 4096], dtype) for i in range(rows // 4096)})
            layout[f"{prefix}filler.last.weight"] = ([rows % 4096 * 4096 + rest], dtype)

        def produce(ldm: str) -> torch.Tensor:
            if ldm in names:
                return source[names[ldm]]
            return initial(ldm, layout[ldm][0], layout[ldm][1], seed=2)

        write_safetensors(path, layout, produce, {"format": "pt"})
    return files[0], files[1]


def _child_env() -> dict[str, str]:
    """The environment of the children: this repository's autoperm first, warnings off."""
    path = os.pathsep.join(p for p in (str(REPOSITORY), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""
"""Runs the measured command and prints its ``ru_maxrss`` and exit code. A child's ``ru_maxrss``
includes the peak of the process it was forked from (the kernel carries it across ``exec``), so the
command is started from this small launcher, never from the benchmark, whose own peak grows
while it creates checkpoints."""


def run_measured(command: list[str], log: Path) -> tuple[float, int, int]:
    """Run a child through :data:`_LAUNCHER`; returns (wall seconds, its own peak RSS in bytes, exit code)."""
    with log.open("w") as stream:
        started = time.perf_counter()
        launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], stdout=stream, stderr=subprocess.PIPE,
                                  text=True, cwd=REPOSITORY, env=_child_env())
        seconds = time.perf_counter() - started
    lines = launcher.stderr.strip().splitlines()
    stream_text = "\n".join(lines[:-1])
    if stream_text:
        with log.open("a") as appended:
            appended.write(stream_text + "\n")
    peak, code = (int(field) for field in lines[-1].split())
    return seconds, peak, code


def recovered(a: Path, out: Path) -> tuple[int, int]:
    """(tensors of OUT that differ from A's, tensors compared); directories or single files."""
    from autoperm.io import mmap_safetensors

    if a.is_file():
        sd_a, sd_out = mmap_safetensors(a), mmap_safetensors(out)
        wrong = sum(not torch.equal(sd_a[name], sd_out[name]) for name in sd_a)
        return wrong, len(sd_a)
    (file,) = [p.name for p in a.glob("*.safetensors")]
    sd_a, sd_out = mmap_safetensors(a / file), mmap_safetensors(out / file)
    wrong = sum(not torch.equal(sd_a[name], sd_out[name]) for name in sd_a)
    return wrong, len(sd_a)


def measure(shape: str, dtype: str, pair: str, workdir: Path, max_iter: int, keep_output: bool = False,
            layout: str = "directory") -> dict[str, Any]:
    """Create (if needed) and match one pair; returns the row of results (OUT is removed unless ``keep_output``).

    ``layout="single-file"`` (UNet shapes): match LDM single files made from the pair's directories.
    """
    pair_dir = workdir / f"{shape}-{dtype}-{pair}"
    started = time.perf_counter()
    a, b = create_pair(shape, dtype, pair, pair_dir)
    out = pair_dir / "out"
    if layout == "single-file":
        a, b = create_single_files(shape, a, b, pair_dir)
        out = pair_dir / "out.safetensors"
        out.unlink(missing_ok=True)
    created = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    command = [sys.executable, "-m", "autoperm", "match", str(a), str(b), "-o", str(out),
               "--max-iter", str(max_iter), "--quiet"]
    seconds, peak, code = run_measured(command, pair_dir / "match.log")
    if code != 0:
        sys.exit(f"autoperm match failed (exit {code}); see {pair_dir / 'match.log'}:\n{(pair_dir / 'match.log').read_text()[-2000:]}")
    _, base, _ = run_measured([sys.executable, "-c", "import torch, autoperm, autoperm.cli"], pair_dir / "base.log")
    weights = sum(p.stat().st_size for d in (a, b) for p in ([d] if d.is_file() else d.glob("*.safetensors")))
    wrong = recovered(a, out) if pair == "planted" else None
    if not keep_output:
        out.unlink() if out.is_file() else shutil.rmtree(out, ignore_errors=True)
    return {
        "shape": shape, "dtype": dtype, "pair": pair, "layout": layout, "loadavg_before": " ".join(load),
        "create_s": round(created, 1), "match_s": round(seconds, 1),
        "weights_a_plus_b_gib": round(weights / 2**30, 3), "peak_rss_gib": round(peak / 2**30, 3),
        "base_rss_gib": round(base / 2**30, 3), "peak_over_weights": round(peak / weights, 2),
        "peak_minus_base_over_weights": round((peak - base) / weights, 2),
        "recovered": None if wrong is None else wrong[0] == 0,
        "tensors_wrong": None if wrong is None else f"{wrong[0]}/{wrong[1]}",
        "command": " ".join(["autoperm", *command[3:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="Where the pairs (kept) and outputs (removed) go.")
    parser.add_argument("--shapes", default="qwen2-0.5b", help=f"Comma-separated, of {', '.join(SHAPES)}.")
    parser.add_argument("--dtypes", default="bfloat16", help=f"Comma-separated, of {', '.join(DTYPES)}.")
    parser.add_argument("--pairs", default="planted", help="Comma-separated: planted, independent.")
    parser.add_argument("--max-iter", type=int, default=100, help="Most weight-matching sweeps.")
    parser.add_argument("--json", type=Path, help="Append each result as one JSON line.")
    parser.add_argument("--layout", choices=("directory", "single-file"), default="directory",
                        help="Match the directories, or (UNet shapes) LDM single files made from them, with the "
                        "VAE and text encoders' sizes filled in.")
    parser.add_argument("--keep-output", action="store_true",
                        help="Keep each pair's OUT directory (under the pair's folder) to compare runs.")
    options = parser.parse_args()
    for shape in options.shapes.split(","):
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        if options.layout == "single-file" and shape not in FILLERS:
            parser.error(f"--layout single-file: {shape!r} is not a Stable Diffusion UNet; choose from {', '.join(FILLERS)}")
        for dtype in options.dtypes.split(","):
            if dtype not in DTYPES:
                parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
            for pair in options.pairs.split(","):
                if pair not in ("planted", "independent"):
                    parser.error(f"unknown pair {pair!r}; choose planted or independent")
                row = measure(shape, dtype, pair, options.workdir, options.max_iter, options.keep_output, options.layout)
                print(json.dumps(row), flush=True)
                if options.json:
                    with options.json.open("a") as stream:
                        stream.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
