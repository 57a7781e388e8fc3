"""Cost of generalised weight matching against permutation weight matching, on LLaMA shapes.

For each shape, builds two independent random-init LLaMA state dicts in memory (float32,
normal(0, 0.02) weights, norm gains drawn around 1 so that folding them matters), infers the spec
on the meta device, and times, ``--repeats`` times each, in this order:

- ``wm``: :func:`autoperm.weight_matching` (the permutation-only time);
- ``align``: :func:`autoperm.align` with ``--symmetries`` (weight matching, canonical forms of
  both models, generalised matching, B back in A's gauge): the whole generalised path;
- ``generalised``: :func:`autoperm.generalized_matching` alone, on the canonical pair after
  the permutations.

Prints the medians and the ratios ``align / wm`` and ``generalised / wm``, measured in the same
run, with the objective after the permutations, after the first sweep and at the end. Everything
stays in the models' dtype (float32 here): the whole ``align`` holds about six copies of a model
(A, B, B permuted, both canonical forms and the descent's B); the ``generalised`` part frees A
and B as it makes the canonical forms (the pair is drawn again for every run, untimed), so
``--parts wm generalised`` runs TinyLlama-1.1B in 24 GiB.

    python benchmarks/bench_generalized.py --shapes llama-tiny --repeats 3
    python benchmarks/bench_generalized.py --shapes llama-156m --repeats 3 --max-iter 2   # the cost of a sweep
    python benchmarks/bench_generalized.py --shapes tinyllama-1.1b --parts wm generalised --max-iter 2 --repeats 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm_scale import SHAPES, infer_llama_spec  # noqa: E402

import autoperm  # noqa: E402


def random_llama(spec: autoperm.PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in spec.shapes.items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[name] = 0.02 * torch.randn(shape, generator=generator)
    return state


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def run_shape(shape: str, symmetries: str, repeats: int, max_iter: int | None, parts: list[str]) -> dict[str, float]:
    limit = {} if max_iter is None else {"max_iter": max_iter}
    spec = infer_llama_spec(shape)
    times: dict[str, list[float]] = {part: [] for part in parts}
    sweeps, history = 0, []
    for _ in range(repeats):
        a, b = random_llama(spec, 0), random_llama(spec, 1)  # drawn again each run: the generalised part frees them
        seconds, result = timed(lambda: autoperm.weight_matching(spec, a, b))
        if "wm" in times:
            times["wm"].append(seconds)
        if "align" in times:
            seconds, _ = timed(lambda: autoperm.align(spec, a, b, symmetries=symmetries, **limit))
            times["align"].append(seconds)
        if "generalised" in times:
            permuted = autoperm.apply_permutation(spec, result.perms, b)
            del b
            canonical, a_c = autoperm.canonicalize(spec, a)
            del a
            _, b_c = autoperm.canonicalize(spec, permuted)
            del permuted
            identity = autoperm.identity_permutation(canonical)
            marks = [time.perf_counter()]
            seconds, found = timed(lambda: autoperm.generalized_matching(
                canonical, a_c, b_c, symmetries, init_perms=identity, callback=lambda *_: marks.append(time.perf_counter()), **limit))
            times["generalised"].append(seconds)
            times.setdefault("first sweep", []).append(marks[1] - marks[0] if len(marks) > 1 else math.nan)
            sweeps, history = found.n_iter, found.history
            del a_c, b_c, found
    medians = {key: statistics.median(values) for key, values in times.items()}
    parameters = sum(torch.Size(s).numel() for s in spec.shapes.values())
    line = f"{shape} ({parameters / 1e6:.0f}M parameters, {symmetries}, {repeats} runs, medians):"
    if "wm" in medians:
        line += f" wm {medians['wm']:.2f} s"
    if "align" in medians:
        line += f", align {medians['align']:.2f} s ({medians['align'] / medians.get('wm', math.nan):.2f}x)"
    if "generalised" in medians:
        line += (f", generalised alone {medians['generalised']:.2f} s ({medians['generalised'] / medians.get('wm', math.nan):.2f}x, "
                 f"{sweeps} sweeps, {medians['generalised'] / max(sweeps, 1):.2f} s a sweep, set-up and first sweep {medians['first sweep']:.2f} s "
                 f"({medians['first sweep'] / medians.get('wm', math.nan):.2f}x)); objective "
                 f"{history[0]:.6g} after the permutations, {history[min(1, len(history) - 1)]:.6g} after one sweep, "
                 f"{history[-1]:.6g} at the end")
    print(line, flush=True)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-tiny"], choices=list(SHAPES))
    parser.add_argument("--symmetries", default="orthogonal", choices=["orthogonal", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-iter", type=int,
                        help="most sweeps of each matching (default: the library's, 100 for align and 50 for "
                        "generalized_matching); fewer to time a sweep on large shapes")
    parser.add_argument("--parts", nargs="+", default=["wm", "align", "generalised"], choices=["wm", "align", "generalised"],
                        help="what to time (weight matching always runs: it is generalised matching's start)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for shape in args.shapes:
        run_shape(shape, args.symmetries, args.repeats, args.max_iter, args.parts)


if __name__ == "__main__":
    main()
