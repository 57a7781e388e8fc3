"""Peak memory and time of `autoperm match` on two Hugging Face directories (Qwen2-0.5B shapes).

Creates two ``save_pretrained`` directories locally (random init, no download) with the shapes
of Qwen2-0.5B (LLaMA architecture with grouped-query attention, q/k/v biases, SwiGLU, RoPE, tied
embeddings; 494M parameters), stored in bfloat16 as the real checkpoint is and sharded
(``--shard-size``). B is a planted permutation of A (``--pair planted``) or a second seed
(``--pair independent``). Then runs ``python -m autoperm match A B -o OUT`` in a child process and
reports its wall time and peak resident memory (``ru_maxrss`` of the child) against the size of
the two models' weights, and checks that OUT holds A again for a planted pair.

    python benchmarks/bench_pretrained.py --workdir ./bench-qwen --max-iter 3
    python benchmarks/bench_pretrained.py --workdir ./bench-tiny --shape tiny     # seconds

Peak RSS (``ru_maxrss`` of the child alone, from ``wait4``) counts the memory-mapped weight pages
the process touched (the files are read through the page cache, not copied), so "weights of A
and B" is the floor for reading both models. The baseline is the same interpreter importing the
same libraries and loading nothing.
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

import torch

SHAPES = {
    # Qwen2-0.5B: hidden 896, 24 layers, 14 query / 2 key-value heads of 64, MLP 4864, vocab 151936
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                       tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=True),
}


def create(workdir: Path, shape: str, pair: str, shard_size: str) -> tuple[Path, Path]:
    """Write A and B (bfloat16, sharded) unless they exist already."""
    import transformers

    from autoperm import apply_permutation, infer_spec, random_permutation

    a, b = workdir / "a", workdir / "b"
    if a.is_dir() and b.is_dir():
        return a, b
    transformers.logging.set_verbosity_error()
    config = transformers.Qwen2Config(**SHAPES[shape])
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.to(torch.bfloat16).save_pretrained(a, max_shard_size=shard_size)
    if pair == "planted":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                meta = transformers.Qwen2ForCausalLM(config)
            spec = infer_spec(meta, torch.randint(0, 100, (1, 16), device="meta"))
        permuted = apply_permutation(spec, random_permutation(spec, seed=1), model.state_dict())
        model.load_state_dict(permuted)
    else:
        torch.manual_seed(1)
        model = transformers.Qwen2ForCausalLM(config).eval()
    model.to(torch.bfloat16).save_pretrained(b, max_shard_size=shard_size)
    return a, b


def run_measured(command: list[str], workdir: Path) -> tuple[float, int, int, str]:
    """Run a child; returns (wall seconds, its own peak RSS in bytes, exit code, stderr)."""
    log = workdir / "child.stderr"
    with log.open("w") as stream:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stream,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    return seconds, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), log.read_text()


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="Where A, B and the output go.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--pair", choices=["planted", "independent"], default="planted")
    parser.add_argument("--shard-size", default="200MB")
    parser.add_argument("--max-iter", type=int, default=100, help="Most weight-matching sweeps.")
    parser.add_argument("--json", type=Path, help="Append the result as one JSON line.")
    options = parser.parse_args()

    options.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    a, b = create(options.workdir, options.shape, options.pair, options.shard_size)
    created = time.perf_counter() - started
    out = options.workdir / "b-aligned"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "autoperm", "match", str(a), str(b), "-o", str(out),
               "--max-iter", str(options.max_iter), "--quiet"]
    seconds, peak, code, stderr = run_measured(command, options.workdir)
    if code != 0:
        sys.exit(f"autoperm match failed:\n{stderr}")
    # the same interpreter with the same imports and nothing loaded: what the weights add to
    _, baseline, _, _ = run_measured([sys.executable, "-c", "import torch, transformers, autoperm.cli, autoperm.pretrained"],
                                     options.workdir)
    weights = weight_bytes(a) + weight_bytes(b)
    recovered = None
    if options.pair == "planted":
        from autoperm import load_state_dict

        sd_a, sd_out = load_state_dict(a), load_state_dict(out)
        recovered = all(torch.equal(sd_a[k], sd_out[k]) for k in sd_a)
    result = {
        "shape": options.shape, "pair": options.pair, "max_iter": options.max_iter,
        "parameters": sum(t.numel() for t in load_weights_shapes(a)),
        "create_s": round(created, 1), "match_s": round(seconds, 1),
        "peak_rss_gib": round(peak / 2**30, 3), "baseline_rss_gib": round(baseline / 2**30, 3),
        "weights_a_plus_b_gib": round(weights / 2**30, 3),
        "peak_over_weights": round(peak / weights, 2), "peak_minus_baseline_over_weights": round((peak - baseline) / weights, 2),
        "recovered": recovered,
        "command": " ".join(["python", "-m", "autoperm", *command[3:]]),
    }
    print(json.dumps(result, indent=2))
    if options.json:
        with options.json.open("a") as stream:
            stream.write(json.dumps(result) + "\n")


def load_weights_shapes(directory: Path) -> list[torch.Tensor]:
    from autoperm import load_state_dict

    return list(load_state_dict(directory).values())


if __name__ == "__main__":
    main()
