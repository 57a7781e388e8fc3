"""Sweep timm's model zoo: one smallest model per family, spec soundness and planted recovery.

For every model (random init, no downloads, timm's default input size) the sweep measures:

* ``infer_spec``: the tracer used (fx or export), the time, the number of active groups;
* soundness: in float64, with every float state entry perturbed (zero-initialised layers would
  hide a wrong permutation), a random permutation drawn from the spec for each of three seeds
  must leave the outputs unchanged: relative error ``max|out_perm - out| / max|out|`` < 1e-9;
* kinds: for models with groups larger than permutations (orthogonal, invertible, scale), the
  same float64 check with a random element of every group's kind (``random_transform``), three
  seeds; for models with foldable norms, the canonical form (``canonicalize``: gains folded into
  their readers) must compute the same function, and so must it under a random element of every
  kind of the canonical spec (the streams that folding enlarges), three seeds;
* coverage: the share of hidden conv/linear output units (axis 0 of ``nn.Conv*d`` / ``nn.Linear``
  weights, the classifier of ``model.get_classifier()`` left out) that some active group moves;
* planted recovery: B is A under ``random_permutation(spec, seed=1)`` (float32);
  ``weight_matching(spec, A, B)`` must return permutations that map B back onto A exactly
  (``torch.equal`` on every tensor). Also reported: the objective against the planted optimum
  ``<A, A>``, the sweeps, convergence, the time, and whether the reported objective equals the
  true objective ``<A, pi(B)>`` of the permutations returned (1e-9 relative).

Each model runs in its own subprocess with a time limit, so that a hang or a crash of one model
never stops the sweep. Results go to a JSON-lines file (rewritten atomically after every model),
followed by a table and one summary line on stdout.

The models are listed in ``zoo_models.txt`` next to this script (one name per line); ``--select``
regenerates it: for every family (the model name up to the first ``_`` or digit) the model with
the fewest parameters, counted on the meta device (nothing is allocated or downloaded).

Usage (from the repository root, timm installed)::

    python benchmarks/zoo_sweep.py --threads 2 --out zoo_results.jsonl
    python benchmarks/zoo_sweep.py --models resnet10t,deit_tiny_patch16_224 --timeout 120
    python benchmarks/zoo_sweep.py --report zoo_results.jsonl   # table and summary again
    python benchmarks/zoo_sweep.py --select            # rewrite zoo_models.txt (minutes)

Needs only the public API of ``autoperm`` (``infer_spec``, ``random_permutation``,
``apply_permutation``, ``weight_matching``), so it also runs against older checkouts via
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from autoperm.io import write_text_atomic

MODELS_FILE = Path(__file__).with_name("zoo_models.txt")
SOUND_TOLERANCE = 1e-9
OBJECTIVE_TOLERANCE = 1e-9
SOUNDNESS_SEEDS = (0, 1, 2)
PLANTED_SEED = 1
PERTURB_SCALE = 0.02
BATCH = 2
_SKIP_COST = ("running_", "num_batches_tracked")


# ------------------------------------------------------------------------------ selection
def family(name: str) -> str:
    """The family of a timm model name: the name up to the first ``_`` or digit."""
    return re.split(r"[_\d]", name)[0]


def count_parameters(name: str) -> int:
    """Parameters of timm model ``name``, built on the meta device (nothing allocated)."""
    import timm
    import torch

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def select_models(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The smallest model of every family; also the names that could not be built."""
    best: dict[str, tuple[int, str]] = {}
    failed: list[str] = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        def tqdm(items, **_):  # type: ignore[no-redef]
            return items
    for name in tqdm(list(names), desc="counting parameters", unit="model"):
        try:
            count = count_parameters(name)
        except Exception:  # noqa: BLE001 - a model that cannot be built is just not a candidate
            failed.append(name)
            continue
        key = family(name)
        if key not in best or (count, name) < best[key]:
            best[key] = (count, name)
    return sorted(name for _, name in best.values()), failed


def read_models(path: Path = MODELS_FILE) -> list[str]:
    """Model names listed in ``path``, one per line (blank lines and ``#`` comments skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


# --------------------------------------------------------------------------- one model
def perturb_(model: Any, seed: int = 0, scale: float = PERTURB_SCALE) -> None:
    """Add small noise to every float state entry (BatchNorm running variances kept positive)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.add_((scale * noise).to(tensor.dtype))
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.5)


def output_tensors(output: Any) -> list[Any]:
    """The tensors of a model output (a tensor, or nested tuples, lists and dicts of them)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


def relative_error(reference: Any, other: Any) -> float:
    """``max|other - reference| / max|reference|`` over all output tensors."""
    ref, oth = output_tensors(reference), output_tensors(other)
    if not ref or len(ref) != len(oth):
        raise RuntimeError(f"model output has {len(ref)} tensor(s), permuted output {len(oth)}")
    scale = max(float(t.abs().max()) for t in ref)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, oth))
    if not math.isfinite(scale) or not math.isfinite(diff):
        raise RuntimeError("model output is not finite")
    return diff / scale if scale > 0 else diff


def classifier_modules(model: Any) -> set[int]:
    """Ids of the modules inside ``model.get_classifier()`` (a module or a tuple of modules)."""
    import torch

    getter = getattr(model, "get_classifier", None)
    if getter is None:
        return set()
    heads = getter()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return {id(m) for head in heads if isinstance(head, torch.nn.Module) for m in head.modules()}


def member_positions(member: Any, size: int) -> list[int]:
    """Axis positions a member touches: ``offset + sum o_k * stride_k + i * inner + s``."""
    starts = [member.offset]
    for count, stride in member.outer:
        starts = [s + o * stride for s in starts for o in range(count)]
    block = [i * member.inner + s for i in range(size) for s in range(member.inner)]
    return [start + b for start in starts for b in block]


def coverage(model: Any, spec: Any) -> dict[str, Any]:
    """Share of hidden conv/linear output units that some active group moves."""
    import torch

    conv_linear = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    heads = classifier_modules(model)
    moved: dict[str, set[int]] = {}
    for group in spec.active_groups:
        for member in group.members:
            if member.axis == 0:
                moved.setdefault(member.param, set()).update(member_positions(member, group.size))
    total = covered = 0
    partial: list[str] = []
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, conv_linear) or id(module) in heads or not isinstance(weight, torch.Tensor):
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        units = weight.shape[0]
        hit = sum(1 for p in moved.get(name, ()) if p < units)
        total += units
        covered += hit
        if hit < units:
            partial.append(name)
    return {
        "hidden_units": total,
        "covered_units": covered,
        "coverage": covered / total if total else 1.0,
        "partial_axes": len(partial),
        "partial_examples": partial[:5],
    }


def spec_completeness(spec: Any) -> dict[str, Any]:
    """The spec's own completeness report, where this version of autoperm has one.

    Returns ``spec_coverage`` (permutable share of hidden units as autoperm counts them) and
    ``fixed_reasons`` (reason -> hidden units kept fixed for it, largest first); empty otherwise.
    """
    report = getattr(spec, "completeness", None)
    if not callable(report):
        return {}
    try:
        found = report()
    except Exception:  # noqa: BLE001 - a spec without a report is not a failure of the model
        return {}
    reasons: dict[str, int] = {}
    for axis in found.fixed:
        reason = re.sub(r"'[^']*'", "'...'", axis.reason)[:80]  # one entry per kind, not per node
        reasons[reason] = reasons.get(reason, 0) + axis.size - axis.permutable
    ordered = dict(sorted(reasons.items(), key=lambda item: -item[1]))
    return {"spec_hidden_units": found.hidden_units, "spec_coverage": found.share, "fixed_reasons": ordered}


def inner_product(spec: Any, a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """``sum <a, b>`` in float64 over the float tensors the spec moves (running stats left out)."""
    total = 0.0
    for name in spec.members_by_param:
        if not a[name].is_floating_point() or any(skip in name for skip in _SKIP_COST):
            continue
        total += float((a[name].double() * b[name].double()).sum())
    return total


def _kind_errors(autoperm: Any, spec: Any, state: dict, model: Any, inputs: Any, reference: Any) -> list[float]:
    """Relative output change under a random element of every group's kind, one per soundness seed."""
    errors = []
    for seed in SOUNDNESS_SEEDS:
        moved = autoperm.apply_transform(spec, autoperm.random_transform(spec, seed=seed), state)
        model.load_state_dict(moved)
        model.train().eval()
        errors.append(relative_error(reference, model(inputs)))
    return errors


def run_model(name: str, threads: int | None = None) -> dict[str, Any]:
    """Every measurement of the sweep for timm model ``name`` (in this process)."""
    import timm
    import torch

    import autoperm

    if threads:
        torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    row: dict[str, Any] = {"model": name, "family": family(name)}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    row["input_size"] = list(size)
    row["params"] = sum(p.numel() for p in model.parameters())
    perturb_(model)
    x = torch.randn((BATCH, *size), generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    spec = autoperm.infer_spec(model, x)
    row["infer_s"] = time.perf_counter() - start
    row["tracer"] = spec.tracer
    row["groups"] = len(spec.active_groups)
    row.update(coverage(model, spec))
    row.update(spec_completeness(spec))

    # Soundness, float64.
    state32 = {k: v.clone() for k, v in model.state_dict().items()}
    model64 = model.double()
    x64 = x.double()
    state64 = {k: v.clone() for k, v in model64.state_dict().items()}  # not views of the live weights
    with torch.no_grad():
        reference = model64(x64)
        errors = []
        for seed in SOUNDNESS_SEEDS:
            permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=seed), state64)
            model64.load_state_dict(permuted)
            model64.train().eval()  # modules caching tensors derived from weights in eval mode rebuild them
            errors.append(relative_error(reference, model64(x64)))
        model64.load_state_dict(state64)
        # Symmetry kinds beyond permutations (autoperm >= issue 20): a random element of every
        # group's kind (Haar orthogonal, well-conditioned invertible, positive scales), three seeds;
        # then the same on the canonical form (norm gains folded), whose streams admit the larger
        # kinds folding gives them.
        larger = [g.name for g in spec.active_groups if getattr(g, "kind", "permutation") != "permutation"]
        kind_errors = []
        if larger and hasattr(autoperm, "random_transform"):
            kind_errors = _kind_errors(autoperm, spec, state64, model64, x64, reference)
        folds = len(getattr(spec, "norm_folds", ()))
        canonical_errors, canonical_larger = [], []
        if folds and hasattr(autoperm, "canonicalize"):
            canonical_spec, canonical_state = autoperm.canonicalize(spec, state64)
            model64.load_state_dict(canonical_state)
            model64.train().eval()
            canonical_errors = [relative_error(reference, model64(x64))]  # folding keeps the function
            canonical_larger = [g.name for g in canonical_spec.active_groups if g.kind != "permutation"]
            if canonical_larger:
                canonical_errors += _kind_errors(autoperm, canonical_spec, canonical_state, model64, x64, reference)
        model64.load_state_dict(state64)
    row["rel_errors"] = errors
    row["max_rel_error"] = max(errors)
    row["sound"] = max(errors) < SOUND_TOLERANCE
    row["kind_groups"] = len(larger)
    row["kind_rel_error"] = max(kind_errors) if kind_errors else None
    row["kinds_sound"] = max(kind_errors) < SOUND_TOLERANCE if kind_errors else None
    row["norm_folds"] = folds
    row["canonical_kind_groups"] = len(canonical_larger)
    row["canonical_rel_error"] = max(canonical_errors) if canonical_errors else None
    row["canonical_sound"] = max(canonical_errors) < SOUND_TOLERANCE if canonical_errors else None
    del model, model64, reference

    # Planted recovery, float32.
    a = state32
    b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=PLANTED_SEED), a)
    start = time.perf_counter()
    result = autoperm.weight_matching(spec, a, b)
    row["wm_s"] = time.perf_counter() - start
    aligned = autoperm.apply_permutation(spec, result.perms, b)
    row["wrong_tensors"] = sum(1 for k in a if not torch.equal(aligned[k], a[k]))
    row["recovered"] = row["wrong_tensors"] == 0
    optimum = inner_product(spec, a, a)
    true_objective = inner_product(spec, a, aligned)
    row["objective"] = result.objective
    row["true_objective"] = true_objective
    row["optimum"] = optimum
    row["objective_ratio"] = true_objective / optimum if optimum else None
    row["objective_ok"] = abs(result.objective - true_objective) <= OBJECTIVE_TOLERANCE * max(1.0, abs(true_objective))
    row["n_iter"] = result.n_iter
    row["converged"] = result.converged
    return row


# ----------------------------------------------------------------------------- sweep
def run_in_subprocess(name: str, timeout: float, threads: int | None) -> dict[str, Any]:
    """:func:`run_model` in a child process; a timeout or a crash becomes a status.

    Where the platform can fork, the child is a fork of this process, which has imported torch,
    timm and autoperm once (a fresh interpreter would spend seconds on imports per model);
    elsewhere a fresh interpreter runs ``--worker``.
    """
    if "fork" in multiprocessing.get_all_start_methods():
        return _run_forked(name, timeout, threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    if threads:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "family": family(name), "status": "timeout", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "wall_s": wall}
    return {"model": name, "family": family(name), "status": f"error: {_last_line(done.stderr, done.returncode)}", "wall_s": wall}


def _last_line(stderr: str, returncode: int | None) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {returncode}"


def _run_forked(name: str, timeout: float, threads: int | None) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    with tempfile.TemporaryFile(mode="w+") as stderr:
        child = context.Process(target=_forked_worker, args=(name, threads, send, stderr.fileno()), daemon=True)
        start = time.perf_counter()
        child.start()
        send.close()
        row = None
        if receive.poll(timeout):
            try:
                row = receive.recv()
            except EOFError:  # the child died without an answer
                pass
        wall = time.perf_counter() - start
        if row is None and child.is_alive():
            child.kill()
            child.join()
            return {"model": name, "family": family(name), "status": "timeout", "wall_s": wall}
        child.join()
        if row is None:
            stderr.seek(0)
            row = {"model": name, "family": family(name), "status": f"error: {_last_line(stderr.read(), child.exitcode)}"}
    receive.close()
    return {**row, "wall_s": wall}


def _forked_worker(name: str, threads: int | None, send: Any, stderr_fd: int) -> None:
    os.dup2(stderr_fd, 2)
    send.send(worker_row(name, threads))
    send.close()


def worker_row(name: str, threads: int | None) -> dict[str, Any]:
    """:func:`run_model`'s row with a status (errors as a status, not a crash)."""
    try:
        row = run_model(name, threads)
        row["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - every failure is a result of the sweep
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        row = {"model": name, "family": family(name), "status": f"error: {type(error).__name__}: {first}"[:300]}
    return row


def worker(name: str, threads: int | None) -> None:
    """Entry point of ``--worker``: one JSON line on stdout."""
    print(json.dumps(worker_row(name, threads)), flush=True)


def problems(row: Mapping[str, Any], slow_infer: float = 10.0) -> list[str]:
    """Why a row falls short (empty when the model passed every check)."""
    if row.get("status") != "ok":
        return [row.get("status", "missing")]
    found = []
    if not row["sound"]:
        found.append(f"unsound ({row['max_rel_error']:.1e})")
    if row.get("kinds_sound") is False:
        found.append(f"kinds unsound ({row['kind_rel_error']:.1e})")
    if row.get("canonical_sound") is False:
        found.append(f"canonical form or its kinds unsound ({row['canonical_rel_error']:.1e})")
    if not row["recovered"]:
        found.append(f"not recovered ({row['wrong_tensors']} tensors wrong, objective {row['objective_ratio'] or 0:.4f} of optimum)")
    if not row["objective_ok"]:
        found.append(f"objective mismatch (reported {row['objective']:.6g}, true {row['true_objective']:.6g})")
    if row["infer_s"] > slow_infer:
        found.append(f"slow infer ({row['infer_s']:.1f} s)")
    return found


def table(rows: list[Mapping[str, Any]]) -> str:
    """A fixed-width table of the rows."""
    header = f"{'model':34} {'tracer':6} {'infer s':>8} {'groups':>6} {'cover':>6} {'rel err':>8} {'rec':>3} {'obj/opt':>8} {'sweeps':>6} {'wm s':>7}  status"
    out = [header, "-" * len(header)]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"{r['model']:34} {r.get('status', '')}")
            continue
        out.append(
            f"{r['model']:34} {r['tracer']:6} {r['infer_s']:8.2f} {r['groups']:6d} {r['coverage']:6.2f}"
            f" {r['max_rel_error']:8.1e} {'yes' if r['recovered'] else 'NO':>3} {r['objective_ratio'] or 0:8.4f}"
            f" {r['n_iter']:6d} {r['wm_s']:7.2f}  {'; '.join(problems(r)) or 'ok'}"
        )
    return "\n".join(out)


def summary(rows: list[Mapping[str, Any]]) -> str:
    """One line: how many models ran, were sound, recovered, and so on."""
    ok = [r for r in rows if r.get("status") == "ok"]
    sound = sum(r["sound"] for r in ok)
    recovered = sum(r["recovered"] for r in ok)
    objective = sum(r["objective_ok"] for r in ok)
    full = sum(r["coverage"] >= 1.0 for r in ok)
    timeouts = sum(r.get("status") == "timeout" for r in rows)
    errors = len(rows) - len(ok) - timeouts
    with_kinds = [r for r in ok if r.get("kinds_sound") is not None]
    kinds = f" kinds beyond permutations sound {sum(r['kinds_sound'] for r in with_kinds)}/{len(with_kinds)};" if with_kinds else ""
    with_folds = [r for r in ok if r.get("canonical_sound") is not None]
    if with_folds:
        kinds += (f" canonical forms and their kinds sound {sum(r['canonical_sound'] for r in with_folds)}/{len(with_folds)}"
                  f" ({sum(r['canonical_kind_groups'] > 0 for r in with_folds)} with larger kinds);")
    infer = sorted(r["infer_s"] for r in ok)
    median = infer[len(infer) // 2] if infer else float("nan")
    return (
        f"{len(rows)} models: {len(ok)} ran ({sum(r['tracer'] == 'fx' for r in ok)} fx,"
        f" {sum(r['tracer'] == 'export' for r in ok)} export), {timeouts} timeouts, {errors} errors;"
        f" sound {sound}/{len(ok)}; planted recovered {recovered}/{len(ok)};"
        f" objective exact {objective}/{len(ok)}; full coverage {full}/{len(ok)};{kinds}"
        f" median infer {median:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated timm names (default: zoo_models.txt)")
    parser.add_argument("--limit", type=int, help="only the first N models")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per model (default 240)")
    parser.add_argument("--out", type=Path, default=Path("zoo_results.jsonl"), help="JSON-lines output")
    parser.add_argument("--threads", type=int, help="torch threads per model (default: torch's own)")
    parser.add_argument("--select", action="store_true", help=f"regenerate {MODELS_FILE.name} and exit")
    parser.add_argument("--report", type=Path, help="print the table and summary of an earlier --out file and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker, args.threads)
        return 0
    if args.report:
        rows = [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
        print(table(rows))
        print(summary(rows))
        return 0
    if args.select:
        import timm

        chosen, failed = select_models(timm.list_models())
        write_text_atomic(MODELS_FILE, "\n".join(chosen) + "\n")
        print(f"{len(chosen)} families written to {MODELS_FILE.name}; {len(failed)} models could not be built")
        return 0

    names = args.models.split(",") if args.models else read_models()
    names = names[: args.limit] if args.limit else names
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import timm  # noqa: F401 - imported once here, inherited by every forked child
    import torch  # noqa: F401
    import tqdm as tqdm_module
    from tqdm import tqdm

    import autoperm  # noqa: F401

    tqdm_module.tqdm.monitor_interval = 0  # no monitor thread alive when children are forked

    rows: list[dict[str, Any]] = []
    progress = tqdm(names, unit="model")
    for name in progress:
        progress.set_postfix_str(name)
        rows.append(run_in_subprocess(name, args.timeout, args.threads))
        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
