"""`autoperm match` and `autoperm merge`: align one checkpoint to another, or merge several."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import click
import torch
import yaml
from tqdm import tqdm

from autoperm.api import activation_matching
from autoperm.cli.common import ModelArgs, load_spec_or_infer, model_settings
from autoperm.cli.directories import (
    check_checkpoint_configs,
    config_mismatch_option,
    load_checkpoint,
    save_in_stored_names,
)
from autoperm.cli.sd_cmds import is_stable_diffusion_input, read_stable_diffusion_pair, refuse_stable_diffusion_merge
from autoperm.errors import CheckpointError, ModelLoadError, SolverError
from autoperm.io import (
    is_checkpoint_directory,
    save_state_dict,
    write_text_atomic,
)
from autoperm.pretrained import is_model_directory, tied_names
from autoperm.solvers import (
    SYMMETRIES,
    align,
    check_state_dicts,
    mean_state_dict,
    merge_many,
    ste_matching,
    weight_matching,
)
from autoperm.spec import apply_permutation
from autoperm.spec.apply import permute_tensor
from autoperm.trace import GraphRunner

__all__ = ["register", "match", "merge"]


def _solver_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--spec", "spec_path", type=click.Path(dir_okay=False), help="Spec YAML (default: infer it)."),
        click.option("--device", default="cpu", show_default=True, help="Device for the cost matmuls / model."),
        click.option("--perms-out", type=click.Path(dir_okay=False), help="Also save the permutations as YAML."),
        click.option("--seed", default=0, show_default=True, help="Seed of the group order."),
        click.option("--max-iter", default=100, show_default=True, help="Most weight-matching sweeps / rounds."),
        click.option("--data", "data_source", help="For ste/act: 'digits' or package.module:function."),
        click.option("--epochs", default=10, show_default=True, help="STE epochs (passes over --data; STE-MM ran 10 of MNIST)."),
        click.option("--lr", type=float, help="Learning rate: STE's (default 1e-3, Adam, as STE-MM), or the "
                     "refinement's with --symmetries (default 1e-2)."),
        click.option("--symmetries", type=click.Choice(SYMMETRIES), default="permutation", show_default=True,
                     help="Symmetry kinds to align with: permutations; also orthogonal maps (streams with norm gains "
                     "folded, head dimensions); or every kind (invertible head maps and scales balanced first)."),
        click.option("--steps", default=300, show_default=True,
                     help="With --symmetries and --method ste: Adam steps learning the maps on --data (continuous maps "
                     "by a parametrisation, permutations straight-through)."),
        click.option("--keep-permutations", is_flag=True,
                     help="With --symmetries and --method ste: learn only the continuous maps; the permutations stay "
                     "as generalised weight matching found them."),
        click.option("--sweep-tol", default=0.0, show_default=True,
                     help="With --symmetries: stop generalised matching after a sweep gaining less than this, "
                     "relatively (1e-3 cuts sweeps 6-10x on small transformers)."),
        click.option("--max-sweeps", type=click.IntRange(min=1),
                     help="With --symmetries: the most generalised-matching sweeps (default: --max-iter). A sweep "
                     "costs about one weight-matching sweep; the first gains the most."),
        click.option("--quiet", is_flag=True, help="No progress bar or summary."),
        click.option("-o", "--output", required=True, type=click.Path(),
                     help="Output checkpoint: a file, or a directory when the inputs are model directories."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@click.command("match")
@click.argument("paths", nargs=-1, metavar="[MODEL] [A B]")
@model_settings
@click.option("--a", "path_a", type=click.Path(), help="Reference checkpoint A (file or directory).")
@click.option("--b", "path_b", type=click.Path(), help="Checkpoint B to align to A (file or directory).")
@click.option("--method", type=click.Choice(["wm", "ste", "act"]), default="wm", show_default=True)
@_solver_options
@config_mismatch_option
def match(
    paths: tuple[str, ...], kwargs: tuple[str, ...], input_shape: tuple[str, ...], dtype: str, path_a: str | None,
    path_b: str | None, method: str, spec_path: str | None, device: str, perms_out: str | None, seed: int,
    max_iter: int, data_source: str | None, epochs: int, lr: float | None, symmetries: str, steps: int,
    keep_permutations: bool, sweep_tol: float, max_sweeps: int | None, quiet: bool, output: str,
    allow_config_mismatch: bool,
) -> None:
    """Permute checkpoint B so that it aligns with checkpoint A; write the permuted B.

    With --symmetries orthogonal or full, B is aligned by generalised weight matching (with
    --method ste every map is then learned on --data: continuous maps by a parametrisation,
    permutations straight-through; with --method act every map is found from activations on
    --data instead) and written in A's gauge: pair the output with A as it is.

    Give MODEL A B, MODEL --a A --b B, or A B where A is a model directory (save_pretrained):
    then MODEL is A's config.json, and when B is a directory the output is a directory in B's
    layout (config and other files copied, same shards, the tensor names as stored). B's
    config.json must name A's class with the same fields (--allow-config-mismatch accepts others).
    """
    if symmetries != "permutation" and perms_out:
        raise click.UsageError(f"--symmetries {symmetries} writes no --perms-out (its maps are not permutations)")
    if not (path_a or path_b) and len(paths) == 2 and is_stable_diffusion_input(paths[0]):
        if symmetries != "permutation":
            raise SolverError(f"--symmetries {symmetries}: Stable Diffusion checkpoints are aligned with permutations only")
        _match_stable_diffusion(paths, method, spec_path, device, perms_out, seed, max_iter, quiet, output)
        return
    model, path_a, path_b = _match_paths(paths, path_a, path_b)
    inputs = [path_a, path_b] + ([spec_path] if spec_path else [])
    _refuse_overwrite([output, perms_out], inputs)
    as_directory = _directory_output(output, path_b)
    args = ModelArgs(model, kwargs, input_shape, dtype)
    module, example = args.build(weights=method != "wm")
    check_checkpoint_configs(args, [path_a, path_b], allow_config_mismatch)
    tied = tied_names(module)
    (sd_a, _), (sd_b, names_b) = (load_checkpoint(path, module, tied, args.name) for path in (path_a, path_b))
    spec = load_spec_or_infer(spec_path, module, example, args.name, args)
    check_state_dicts(spec, [module.state_dict(), sd_a, sd_b], names=[f"model {model!r}", path_a, path_b])
    data = _load_data(data_source, method)
    if symmetries != "permutation":
        _match_generalised(spec, module, sd_a, sd_b, names_b, symmetries, method, data, steps, lr, seed, max_iter, device,
                           quiet, output, inputs, as_directory, sweep_tol, max_sweeps, not keep_permutations)
        return
    lr = 1e-3 if lr is None else lr
    with _progress(quiet, "epochs" if method == "ste" else "sweeps", epochs if method == "ste" else max_iter) as step:
        if method == "wm":
            with _group_progress(quiet) as visited:
                result = weight_matching(spec, sd_a, sd_b, max_iter=max_iter, seed=seed, device=device, callback=step,
                                         group_callback=visited)
        elif method == "ste":
            result = ste_matching(spec, module, sd_a, sd_b, data, epochs=epochs, lr=lr, seed=seed, device=device, callback=step)
        else:
            result = activation_matching(spec, module, sd_a, sd_b, data, max_iter=max_iter, seed=seed, device=device)
    del sd_a  # A's pages are not needed to write B: unmapped before the output is written
    if as_directory:
        members = spec.members_by_param

        def permute(name: str, tensor: torch.Tensor) -> torch.Tensor:
            return permute_tensor(spec, result.perms, name, tensor) if name in members else tensor

        save_in_stored_names(sd_b, names_b, output, inputs=inputs, transform=permute)
    else:
        save_state_dict(apply_permutation(spec, result.perms, sd_b), output, inputs=inputs)
    if perms_out:
        _write_perms(result.perms, perms_out)
    if not quiet:
        details = f", midpoint loss {result.loss:.4g}" if result.loss is not None else ""
        if result.fallback_groups:
            details += f", weight matching for {list(result.fallback_groups)}"
        click.echo(f"{method}: objective {result.objective:.6g} after {result.n_iter} iteration(s){details}; wrote {output}")


def _match_generalised(
    spec: Any, module: torch.nn.Module, sd_a: dict[str, torch.Tensor], sd_b: dict[str, torch.Tensor], names_b: Any,
    symmetries: str, method: str, data: Any, steps: int, lr: float | None, seed: int, max_iter: int, device: str,
    quiet: bool, output: str, inputs: Sequence[str], as_directory: bool, sweep_tol: float = 0.0,
    max_sweeps: int | None = None, learn_permutations: bool = True,
) -> None:
    """`match --symmetries orthogonal|full`: :func:`autoperm.align`, B written in A's gauge."""
    learn = steps if method == "ste" else 0
    activations = {"method": "act", "runner": GraphRunner.for_spec(spec, module)} if method == "act" else {}
    result = align(spec, sd_a, sd_b, symmetries=symmetries, seed=seed, max_iter=max_iter, model=module, data=data,
                   steps=learn, lr=1e-2 if lr is None else lr, device=device, sweep_tol=sweep_tol, max_sweeps=max_sweeps,
                   learn_permutations=learn_permutations, **activations)
    aligned = result.state_dict
    del sd_a
    if as_directory:
        save_in_stored_names(sd_b, names_b, output, inputs=inputs,
                             transform=lambda name, tensor: aligned[name].to(tensor.dtype) if name in aligned else tensor)
    else:
        save_state_dict({name: aligned[name].to(tensor.dtype) for name, tensor in sd_b.items()}, output, inputs=inputs)
    if not quiet:
        what = "maps" if learn_permutations else "continuous maps"
        learned = (f", {what} learned for {learn} steps (batch loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g})"
                   if result.losses else ", nothing to learn (no continuous maps)" if learn else "")
        start = "B as it is" if method == "act" else "permutations"
        how = " (activation matching)" if method == "act" else ""
        click.echo(f"{symmetries} symmetries{how}: objective {result.start_objective:.6g} ({start}) -> {result.objective:.6g} "
                   f"after {result.sweeps} sweep(s){learned}; B is in A's gauge, pair it with A as it is; wrote {output}")


@click.command("merge")
@click.argument("paths", nargs=-1, required=True, metavar="[MODEL] CHECKPOINTS...")
@model_settings
@click.option("--method", type=click.Choice(["wm", "ste"]), default="wm", show_default=True)
@click.option("--scheme", type=click.Choice(["mergemany", "anchor"]), help="Default: mergemany (wm), anchor (ste).")
@_solver_options
@config_mismatch_option
def merge(
    paths: tuple[str, ...], kwargs: tuple[str, ...], input_shape: tuple[str, ...], dtype: str,
    method: str, scheme: str | None, spec_path: str | None, device: str, perms_out: str | None, seed: int,
    max_iter: int, data_source: str | None, epochs: int, lr: float | None, symmetries: str, steps: int,
    keep_permutations: bool, sweep_tol: float, max_sweeps: int | None, quiet: bool, output: str,
    allow_config_mismatch: bool,
) -> None:
    """Align CHECKPOINTS (two or more) and write their mean, in the first one's frame.

    With --symmetries orthogonal or full, every checkpoint is aligned to the first by
    `autoperm.align` (in its gauge; --method ste learns the maps on --data) and the
    mean is taken: the anchor scheme.

    MODEL may be left out when the first checkpoint is a model directory with weights
    (save_pretrained): its config.json gives the model, and the output is a directory in its
    layout.
    """
    refuse_stable_diffusion_merge(paths[0])
    model, checkpoints = _merge_paths(paths)
    if len(checkpoints) < 2:
        raise SolverError(f"merge needs at least two checkpoints, got {len(checkpoints)}")
    inputs = list(checkpoints) + ([spec_path] if spec_path else [])
    _refuse_overwrite([output, perms_out], inputs)
    as_directory = _directory_output(output, checkpoints[0])
    args = ModelArgs(model, kwargs, input_shape, dtype)
    module, example = args.build(weights=method != "wm")
    check_checkpoint_configs(args, checkpoints, allow_config_mismatch)
    tied = tied_names(module)
    loaded = [load_checkpoint(path, module, tied, args.name) for path in checkpoints]
    state_dicts = [state_dict for state_dict, _ in loaded]
    spec = load_spec_or_infer(spec_path, module, example, args.name, args)
    check_state_dicts(spec, [module.state_dict(), *state_dicts], names=[f"model {model!r}", *checkpoints])
    data = _load_data(data_source, method)
    if symmetries != "permutation":
        if perms_out or scheme == "mergemany":
            raise click.UsageError(f"--symmetries {symmetries} merges by the anchor scheme and writes no --perms-out")
        learn = steps if method == "ste" else 0
        with _progress(quiet, "models", len(checkpoints) - 1) as step:
            aligned = []
            for index, other in enumerate(state_dicts[1:], start=1):
                found = align(spec, state_dicts[0], other, symmetries=symmetries, seed=seed, max_iter=max_iter, model=module,
                              data=data, steps=learn, lr=1e-2 if lr is None else lr, device=device, sweep_tol=sweep_tol,
                              max_sweeps=max_sweeps, learn_permutations=not keep_permutations)
                aligned.append(found.state_dict)
                step(index, found.objective)
        merged = mean_state_dict([state_dicts[0], *aligned])
        merged = {name: merged[name].to(tensor.dtype) for name, tensor in state_dicts[0].items()}
        rounds = f"anchor scheme, {symmetries} symmetries"
    else:
        with _progress(quiet, "rounds", max_iter if method == "wm" else len(checkpoints) - 1) as step:
            result = merge_many(
                spec, state_dicts, method=method, scheme=scheme, model=module, data=data, max_rounds=max_iter,
                seed=seed, device=device, callback=step, **({"epochs": epochs, "lr": 1e-3 if lr is None else lr} if method == "ste" else {}),
            )
        merged, rounds = result.state_dict, f"{result.n_iter} round(s)"
    if as_directory:
        save_in_stored_names(merged, loaded[0][1], output, inputs=inputs)
    else:
        save_state_dict(merged, output, inputs=inputs)
    if perms_out:
        _write_perms({f"{path}": perms for path, perms in zip(checkpoints, result.perms)}, perms_out)
    if not quiet:
        click.echo(f"merged {len(checkpoints)} models ({method}, {rounds}); wrote {output}")


def _match_stable_diffusion(
    paths: Sequence[str], method: str, spec_path: str | None, device: str, perms_out: str | None, seed: int,
    max_iter: int, quiet: bool, output: str,
) -> None:
    """`match A B` where A is a single weights file or a diffusers pipeline (see :mod:`autoperm.cli.sd_cmds`)."""
    if method != "wm":
        raise SolverError(f"--method {method}: Stable Diffusion checkpoints are aligned by weight matching (--method wm)")
    inputs = list(paths) + ([spec_path] if spec_path else [])
    _refuse_overwrite([output, perms_out], inputs)
    pair = read_stable_diffusion_pair(paths[0], paths[1], output, spec_path)
    with _progress(quiet, "sweeps", max_iter) as step, _group_progress(quiet) as visited:
        result = weight_matching(pair.spec, pair.state_dict_a, pair.state_dict_b, max_iter=max_iter, seed=seed,
                                 device=device, callback=step, group_callback=visited)
    summary = pair.write(result.perms, output, inputs)
    if perms_out:
        _write_perms(result.perms, perms_out)
    if not quiet:
        click.echo(f"wm: objective {result.objective:.6g} after {result.n_iter} iteration(s); {summary}; wrote {output}")


def _match_paths(paths: Sequence[str], path_a: str | None, path_b: str | None) -> tuple[str, str, str]:
    """``(MODEL, A, B)`` from ``MODEL --a A --b B``, ``MODEL A B`` or ``A B`` (MODEL = A's config)."""
    if path_a or path_b:
        if not (path_a and path_b):
            raise click.UsageError("give both --a and --b (or A and B as arguments)")
        if len(paths) != 1:
            raise click.UsageError(f"with --a and --b, give exactly one MODEL argument (got {len(paths)})")
        return paths[0], path_a, path_b
    if len(paths) == 3:
        return paths[0], paths[1], paths[2]
    if len(paths) == 2:
        if not is_model_directory(paths[0]):
            raise ModelLoadError(
                f"{paths[0]!r} is not a model directory with config.json, so MODEL cannot be taken from it; "
                "give MODEL first: autoperm match MODEL A B"
            )
        return paths[0], paths[0], paths[1]
    raise click.UsageError(f"expected MODEL A B, or A B for model directories (got {len(paths)} argument(s))")


def _merge_paths(paths: Sequence[str]) -> tuple[str, list[str]]:
    """``(MODEL, checkpoints)``: MODEL is the first argument unless it is a model directory with weights."""
    first = paths[0]
    if is_model_directory(first) and is_checkpoint_directory(first):
        return first, list(paths)
    if Path(first).is_file():
        raise ModelLoadError(
            f"{first!r} is a checkpoint file, not a model; give MODEL (package.module:attr or a model directory) first"
        )
    return first, list(paths[1:])


def _directory_output(output: str, reference: str) -> bool:
    """Whether to write a directory: the reference checkpoint is one and OUTPUT has no file suffix."""
    if not Path(reference).is_dir() or Path(output).suffix in _FILE_SUFFIXES:
        return False
    if Path(output).exists():
        raise CheckpointError(f"output {output!r} already exists; remove it or choose another path")
    return True


def register(cli: click.Group) -> None:
    """Add `match` and `merge` to the `autoperm` command group."""
    cli.add_command(match)
    cli.add_command(merge)


def _refuse_overwrite(outputs: Sequence[str | None], inputs: Sequence[str]) -> None:
    resolved = {Path(path).resolve() for path in inputs}
    for output in outputs:
        if not output:
            continue
        target = Path(output).resolve()
        if target in resolved:
            raise CheckpointError(f"refusing to overwrite input file {output!r}; choose another output path")
        inside = [path for path in resolved if path in target.parents and path.is_dir()]
        if inside:
            raise CheckpointError(f"refusing to write {output!r} inside the input directory {str(inside[0])!r}")


def _load_data(source: str | None, method: str) -> Any:
    if method == "wm":
        return None
    if not source:
        raise SolverError(f"--method {method} needs --data ('digits' or package.module:function)")
    from autoperm.data import load_data

    splits = load_data(source)
    return splits.get("train", splits.get("data", next(iter(splits.values()))))


@contextmanager
def _progress(quiet: bool, unit: str, total: int) -> Iterator[Callable[[int, float], None]]:
    bar = tqdm(total=total, unit=unit[:-1], desc=unit, disable=quiet, leave=False)

    def step(_: int, value: float) -> None:
        bar.update(1)
        bar.set_postfix(objective=f"{value:.4g}")

    try:
        yield step
    finally:
        bar.close()


@contextmanager
def _group_progress(quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A second bar under the sweeps: the groups solved so far in the current sweep."""
    bar = tqdm(unit="group", desc="groups", disable=quiet, leave=False, position=1)

    def visited(done: int, total: int) -> None:
        if done == 1:
            bar.reset(total=total)
        bar.update(1)

    try:
        yield visited
    finally:
        bar.close()


def _write_perms(perms: Mapping[str, Any], path: str) -> None:
    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.tolist()
        return {key: plain(item) for key, item in value.items()}

    write_text_atomic(Path(path), yaml.safe_dump(plain(dict(perms)), sort_keys=False, default_flow_style=None, width=10**6))


def load_perms(path: str) -> dict[str, torch.Tensor]:
    """Read a ``--perms-out`` file back into ``{group: LongTensor}``."""
    data = yaml.safe_load(Path(path).read_text())
    return {name: torch.tensor(value, dtype=torch.long) for name, value in data.items()}
