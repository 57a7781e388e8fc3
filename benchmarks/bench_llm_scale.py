"""Weight matching of LLaMA-architecture pairs, from 100M parameters up to 1.1B (CPU) and 7B (GPU).

Creates, under ``--workdir`` (kept between runs), three checkpoints per shape as safetensors,
one tensor at a time (the models are never built in memory; the spec is inferred on the meta
device): ``a`` (random init like transformers' LLaMA: normal(0, 0.02) weights, unit norms),
``planted`` (a random permutation of ``a`` from the spec, plus normal noise of
``--noise`` x 0.02) and ``independent`` (another random init). Then, in a fresh subprocess per
pair (so that its peak RSS is its own), memory-maps both checkpoints and runs
``autoperm.weight_matching``, reporting: time in total and per sweep, the share in linear
assignment (LAP) and in cost products (matmuls), peak RSS (``VmHWM``) or peak CUDA memory,
sweeps, convergence, and for the planted pair whether every tensor of the matched model equals
the original exactly once the noise is left out (planted recovery).

    python benchmarks/bench_llm_scale.py --shapes llama-156m --pairs planted,independent
    python benchmarks/bench_llm_scale.py --shapes tinyllama-1.1b --pairs planted --lap lapx
    python benchmarks/bench_llm_scale.py --shapes llama-7b --dtype bfloat16 --device cuda

Shapes: see ``SHAPES``. The checkpoints take ``4 x params`` bytes each in float32 (TinyLlama:
4.4 GB each, 13 GB for the three); ``--workdir`` defaults to ``./llm-scale-checkpoints``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SHAPES: dict[str, dict[str, int]] = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024),
    "llama-156m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "llama-340m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=24, num_key_value_heads=4, vocab_size=32000),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def infer_llama_spec(shape: str):
    """The permutation spec of a LLaMA of this shape, inferred on the meta device (no weights)."""
    import autoperm
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], use_cache=False, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return autoperm.infer_spec(model, torch.zeros(1, 8, dtype=torch.long, device="meta"), model_name=f"llama:{shape}")


def _init(name: str, shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """LLaMA's initialisation, seeded per tensor so every checkpoint is reproducible."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
    return (0.02 * torch.randn(shape, generator=generator)).to(dtype)


def create_checkpoints(spec, workdir: Path, dtype: torch.dtype, noise: float, pairs: list[str]) -> dict[str, Path]:
    """Write ``a`` and the B models of ``pairs`` (skipping files that exist) and the planted perms."""
    import autoperm
    from autoperm.io import mmap_safetensors, write_safetensors
    from autoperm.spec import permute_tensor

    workdir.mkdir(parents=True, exist_ok=True)
    layout = {name: (list(shape), dtype) for name, shape in spec.shapes.items()}
    paths = {kind: workdir / f"{kind}.safetensors" for kind in ("a", "planted", "independent")}
    perms = autoperm.random_permutation(spec, seed=123)
    if not paths["a"].exists():
        write_safetensors(paths["a"], layout, lambda name: _init(name, layout[name][0], dtype, seed=0))
    if "independent" in pairs and not paths["independent"].exists():
        write_safetensors(paths["independent"], layout, lambda name: _init(name, layout[name][0], dtype, seed=1))
    if "planted" in pairs and not paths["planted"].exists():
        a = mmap_safetensors(paths["a"])

        def planted(name: str) -> torch.Tensor:
            moved = permute_tensor(spec, perms, name, a[name])
            if name.endswith("norm.weight"):
                return moved.clone()
            generator = torch.Generator().manual_seed(sum(map(ord, name)) + 17)
            return (moved.float() + noise * 0.02 * torch.randn(moved.shape, generator=generator)).to(dtype)

        write_safetensors(paths["planted"], layout, planted)
        torch.save(perms, workdir / "planted_perms.pt")  # the permutation the file was made with
    return paths


def _status_gib(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (Linux), in GiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 2**20


def run_one(args: argparse.Namespace) -> None:
    """Child process: memory-map one pair, run weight matching, print one JSON line."""
    import importlib

    import autoperm

    heads_module = importlib.import_module("autoperm.solvers.heads")
    wm = importlib.import_module("autoperm.solvers.weight_matching")
    costs = importlib.import_module("autoperm.solvers.costs")
    from autoperm.solvers.lap import linear_assignment
    from autoperm.io import mmap_safetensors
    from autoperm.spec import PermutationSpec, invert_permutation, permute_tensor

    torch.set_num_threads(args.threads)
    spec = PermutationSpec.from_yaml(args.spec)
    baseline_gib = _status_gib("VmRSS")  # interpreter, torch, scipy: not the run's own memory
    sd_a = mmap_safetensors(args.a)
    sd_b = mmap_safetensors(args.b)
    spent: dict = {"lap": 0.0, "products": 0.0, "lap_calls": 0, "lap_max_n": 0, "lap_methods": {}}

    def count_lap(start: float, n: int) -> None:
        spent["lap"] += time.perf_counter() - start
        spent["lap_calls"] += 1
        spent["lap_max_n"] = max(spent["lap_max_n"], n)

    def timed_assignment(cost, maximize=True, method="auto", **options):
        start = time.perf_counter()
        result = linear_assignment(cost, maximize=maximize, method=method, **options)
        count_lap(start, cost.shape[0])
        spent["lap_methods"][result.method] = spent["lap_methods"].get(result.method, 0) + 1
        return result

    def timed(function):
        def wrapper(*a, **k):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = function(*a, **k)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            spent["products"] += time.perf_counter() - start
            return out
        return wrapper

    heads_module.linear_assignment = timed_assignment  # the head solver's small LAPs
    wm.linear_assignment = timed_assignment
    options: dict = {"lap": args.lap}
    if args.cache_gib is not None:
        options["cache_bytes"] = int(args.cache_gib * 2**30)
    costs.CostCache._product = timed(costs.CostCache._product)
    costs.CostCache._refresh = timed(costs.CostCache._refresh)
    sweep_times: list[float] = []
    last = [time.perf_counter()]

    def callback(sweep: int, objective: float) -> None:
        now = time.perf_counter()
        sweep_times.append(now - last[0])
        last[0] = now

    start = time.perf_counter()
    last[0] = start
    result = autoperm.weight_matching(spec, sd_a, sd_b, max_iter=args.max_iter, seed=0, device=args.device, callback=callback, **options)
    total = time.perf_counter() - start
    report = {
        "total_s": total, "sweeps": result.n_iter, "converged": result.converged,
        "sweep_s": sweep_times, "lap_s": spent["lap"], "lap_calls": spent["lap_calls"], "lap_max_n": spent["lap_max_n"], "lap_methods": spent["lap_methods"],
        "products_s": spent["products"], "objective_start": result.history[0], "objective": result.objective,
    }
    if args.planted_perms:
        planted = torch.load(args.planted_perms, weights_only=True)
        expected = invert_permutation(spec, planted)
        groups_ok = sum(torch.equal(result.perms[g], expected[g]) for g in expected)
        report["planted_groups_recovered"] = f"{groups_ok}/{len(expected)}"
        # B = pi(A) + noise; recovered iff undoing the found perms on pi(A) gives A exactly, tensor by tensor.
        wrong = [name for name in spec.members_by_param
                 if not torch.equal(permute_tensor(spec, result.perms, name, permute_tensor(spec, planted, name, sd_a[name])), sd_a[name])]
        report["planted_tensors_wrong"] = len(wrong)
    report["peak_rss_gib"] = _status_gib("VmHWM")
    report["baseline_rss_gib"] = baseline_gib
    if args.device.startswith("cuda"):
        report["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(report), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-156m")
    parser.add_argument("--pairs", default="planted,independent")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lap", default="auto", choices=["auto", "scipy", "lapx", "auction"])
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--cache-gib", type=float, help="weight matching's cache for cost products (default: its own)")
    parser.add_argument("--noise", type=float, default=0.1, help="planted noise, as a fraction of the init std")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--workdir", default="llm-scale-checkpoints")
    parser.add_argument("--json", help="append one JSON line per run here")
    parser.add_argument("--create-only", action="store_true", help="write the checkpoints and stop")
    # child-process mode
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--a", help=argparse.SUPPRESS)
    parser.add_argument("--b", help=argparse.SUPPRESS)
    parser.add_argument("--planted-perms", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(args)
        return
    for shape in args.shapes.split(","):
        workdir = Path(args.workdir) / f"{shape}-{args.dtype}"
        start = time.perf_counter()
        spec = infer_llama_spec(shape)
        spec_time = time.perf_counter() - start
        workdir.mkdir(parents=True, exist_ok=True)
        spec.to_yaml(workdir / "spec.yaml")
        start = time.perf_counter()
        paths = create_checkpoints(spec, workdir, DTYPES[args.dtype], args.noise, args.pairs.split(","))
        params = sum(torch.Size(s).numel() for s in spec.shapes.values())
        weights_gib = 2 * params * torch.empty((), dtype=DTYPES[args.dtype]).element_size() / 2**30
        print(f"{shape}: {params / 1e6:.0f}M parameters, {weights_gib:.2f} GiB for the pair ({args.dtype}); "
              f"spec {spec_time:.1f} s ({len(spec.groups)} groups), checkpoints {time.perf_counter() - start:.1f} s", flush=True)
        for pair in [] if args.create_only else args.pairs.split(","):
            command = [sys.executable, __file__, "--run-one", "--spec", str(workdir / "spec.yaml"), "--a", str(paths["a"]),
                       "--b", str(paths[pair]), "--device", args.device, "--lap", args.lap, "--max-iter", str(args.max_iter),
                       "--threads", str(args.threads)] + ([] if args.cache_gib is None else ["--cache-gib", str(args.cache_gib)])
            if pair == "planted":
                command += ["--planted-perms", str(workdir / "planted_perms.pt")]
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode or not lines:
                print(f"  {pair}: failed (exit {completed.returncode})\n{completed.stderr[-3000:]}", flush=True)
                continue
            report = json.loads(lines[-1][len("RESULT "):])
            report.update(shape=shape, pair=pair, dtype=args.dtype, device=args.device, lap=args.lap,
                          params_m=round(params / 1e6), weights_gib=weights_gib)
            sweeps = report["sweep_s"]
            per_sweep = f"{sweeps[0]:.1f} s first, {sorted(sweeps[1:])[len(sweeps[1:]) // 2]:.1f} s median later" if len(sweeps) > 1 else f"{sweeps[0]:.1f} s"
            grown = report["peak_rss_gib"] - report["baseline_rss_gib"]
            memory = (f"peak RSS {report['peak_rss_gib']:.2f} GiB ({report['peak_rss_gib'] / weights_gib:.2f}x the pair; "
                      f"{grown:.2f} GiB = {grown / weights_gib:.2f}x above the {report['baseline_rss_gib']:.2f} GiB after imports)")
            if "peak_cuda_gib" in report:
                memory += f", peak CUDA {report['peak_cuda_gib']:.2f} GiB"
            recovery = f", planted: {report['planted_groups_recovered']} groups, {report['planted_tensors_wrong']} tensors wrong" if pair == "planted" else ""
            print(f"  {pair}: {report['total_s']:.1f} s, {report['sweeps']} sweeps ({'converged' if report['converged'] else 'NOT converged'}; "
                  f"{per_sweep}), LAP {report['lap_s']:.1f} s ({report['lap_calls']} calls, n <= {report['lap_max_n']}, {report['lap_methods']}), "
                  f"products {report['products_s']:.1f} s, {memory}{recovery}", flush=True)
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
