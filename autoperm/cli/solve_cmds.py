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

from autoperm.checkpoint import load_state_dict, save_state_dict
from autoperm.cli.common import build_model, load_spec_or_infer, model_options
from autoperm.errors import CheckpointError, SolverError
from autoperm.solvers import (
    activation_matching,
    check_state_dicts,
    merge_many,
    ste_matching,
    weight_matching,
)
from autoperm.spec import apply_permutation
from autoperm.spec.schema import write_text_atomic

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
        click.option("--lr", default=1e-3, show_default=True, help="STE learning rate (Adam, as STE-MM)."),
        click.option("--quiet", is_flag=True, help="No progress bar or summary."),
        click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output checkpoint."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command("match")
@model_options
@click.option("--a", "path_a", required=True, type=click.Path(dir_okay=False), help="Reference checkpoint A.")
@click.option("--b", "path_b", required=True, type=click.Path(dir_okay=False), help="Checkpoint B to align to A.")
@click.option("--method", type=click.Choice(["wm", "ste", "act"]), default="wm", show_default=True)
@_solver_options
def match(
    model: str, kwargs: tuple[str, ...], input_shape: tuple[str, ...], dtype: str, path_a: str, path_b: str,
    method: str, spec_path: str | None, device: str, perms_out: str | None, seed: int, max_iter: int,
    data_source: str | None, epochs: int, lr: float, quiet: bool, output: str,
) -> None:
    """Permute checkpoint B so that it aligns with checkpoint A; write the permuted B."""
    inputs = [path_a, path_b] + ([spec_path] if spec_path else [])
    _refuse_overwrite([output, perms_out], inputs)
    module, example = build_model(model, kwargs, input_shape, dtype)
    spec = load_spec_or_infer(spec_path, module, example, model)
    sd_a, sd_b = load_state_dict(path_a), load_state_dict(path_b)
    check_state_dicts(spec, [module.state_dict(), sd_a, sd_b], names=[f"model {model!r}", path_a, path_b])
    data = _load_data(data_source, method)
    with _progress(quiet, "epochs" if method == "ste" else "sweeps", epochs if method == "ste" else max_iter) as step:
        if method == "wm":
            result = weight_matching(spec, sd_a, sd_b, max_iter=max_iter, seed=seed, device=device, callback=step)
        elif method == "ste":
            result = ste_matching(spec, module, sd_a, sd_b, data, epochs=epochs, lr=lr, seed=seed, device=device, callback=step)
        else:
            result = activation_matching(spec, module, sd_a, sd_b, data, max_iter=max_iter, seed=seed, device=device)
    save_state_dict(apply_permutation(spec, result.perms, sd_b), output, inputs=inputs)
    if perms_out:
        _write_perms(result.perms, perms_out)
    if not quiet:
        details = f", midpoint loss {result.loss:.4g}" if result.loss is not None else ""
        if result.fallback_groups:
            details += f", weight matching for {list(result.fallback_groups)}"
        click.echo(f"{method}: objective {result.objective:.6g} after {result.n_iter} iteration(s){details}; wrote {output}")


@click.command("merge")
@model_options
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(["wm", "ste"]), default="wm", show_default=True)
@click.option("--scheme", type=click.Choice(["mergemany", "anchor"]), help="Default: mergemany (wm), anchor (ste).")
@_solver_options
def merge(
    model: str, kwargs: tuple[str, ...], input_shape: tuple[str, ...], dtype: str, checkpoints: tuple[str, ...],
    method: str, scheme: str | None, spec_path: str | None, device: str, perms_out: str | None, seed: int,
    max_iter: int, data_source: str | None, epochs: int, lr: float, quiet: bool, output: str,
) -> None:
    """Align CHECKPOINTS (two or more) and write their mean, in the first one's frame."""
    if len(checkpoints) < 2:
        raise SolverError(f"merge needs at least two checkpoints, got {len(checkpoints)}")
    inputs = list(checkpoints) + ([spec_path] if spec_path else [])
    _refuse_overwrite([output, perms_out], inputs)
    module, example = build_model(model, kwargs, input_shape, dtype)
    spec = load_spec_or_infer(spec_path, module, example, model)
    state_dicts = [load_state_dict(path) for path in checkpoints]
    check_state_dicts(spec, [module.state_dict(), *state_dicts], names=[f"model {model!r}", *checkpoints])
    data = _load_data(data_source, method)
    with _progress(quiet, "rounds", max_iter if method == "wm" else len(checkpoints) - 1) as step:
        result = merge_many(
            spec, state_dicts, method=method, scheme=scheme, model=module, data=data, max_rounds=max_iter,
            seed=seed, device=device, callback=step, **({"epochs": epochs, "lr": lr} if method == "ste" else {}),
        )
    save_state_dict(result.state_dict, output, inputs=inputs)
    if perms_out:
        _write_perms({f"{path}": perms for path, perms in zip(checkpoints, result.perms)}, perms_out)
    if not quiet:
        click.echo(f"merged {len(checkpoints)} models ({method}, {result.n_iter} round(s)); wrote {output}")


def register(cli: click.Group) -> None:
    """Add `match` and `merge` to the `autoperm` command group."""
    cli.add_command(match)
    cli.add_command(merge)


def _refuse_overwrite(outputs: Sequence[str | None], inputs: Sequence[str]) -> None:
    resolved = {Path(path).resolve() for path in inputs}
    for output in outputs:
        if output and Path(output).resolve() in resolved:
            raise CheckpointError(f"refusing to overwrite input file {output!r}; choose another output path")


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
