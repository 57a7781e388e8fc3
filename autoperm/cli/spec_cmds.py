"""`autoperm spec` and `autoperm verify`."""

from __future__ import annotations

import os
from pathlib import Path

import click
from torch import nn

from autoperm.cli.common import ModelArgs, model_options
from autoperm.errors import SpecError
from autoperm.spec.kinds import KINDS

__all__ = ["register"]


def _group_table(spec) -> str:
    rows = [("group", "size", "members", "kind", "note")]
    for group in spec.groups:
        note = "fixed" if group.fixed else (f"per {group.per}" if group.per else "")
        rows.append((group.name, str(group.size), str(len(group.members)), group.kind, note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _kind_lines(spec, limit: int = 15) -> str:
    """How many groups admit each kind, and the op that kept each scale / orthogonal group from the next kind."""
    counts: dict[str, int] = {}
    for group in spec.active_groups:
        counts[group.kind] = counts.get(group.kind, 0) + 1
    lines = ["kinds: " + (", ".join(f"{counts[kind]} {kind}" for kind in KINDS if kind in counts) or "no active groups")]
    limited = [g for g in spec.active_groups if g.kind_limited_by]
    for group in limited[:limit]:
        lines.append(f"  {group.name}: {group.kind}, limited by {group.kind_limited_by}")
    if len(limited) > limit:
        lines.append(f"  ... and {len(limited) - limit} more (kind_limited_by in the YAML)")
    return "\n".join(lines)


def _completeness_lines(spec, limit: int = 15) -> str:
    """How many hidden units the spec permutes, and why the rest stay fixed."""
    report = spec.completeness()
    lines = [f"hidden units permutable: {report.permutable_units} of {report.hidden_units} ({100 * report.share:.1f}%)"]
    for axis in report.fixed[:limit]:
        lines.append(f"  {axis.param} axis {axis.axis}: {axis.size - axis.permutable} of {axis.size} fixed: {axis.reason}")
    if len(report.fixed) > limit:
        lines.append(f"  ... and {len(report.fixed) - limit} more (listed under kept_fixed in the YAML)")
    return "\n".join(lines)


@click.command("spec")
@model_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the YAML spec here (default: stdout).")
@click.option("--tracer", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True)
def spec_command(model: str, kwargs, input_shape, dtype: str, output: str | None, tracer: str) -> None:
    """Infer the permutation groups of MODEL (package.module:attr or a model directory); write YAML."""

    args = ModelArgs(model, kwargs, input_shape, dtype)
    module, inputs = args.build()
    spec = args.infer(module, inputs, tracer=tracer)
    if output:
        spec.to_yaml(output)
        click.echo(_group_table(spec), err=False)
        click.echo(_kind_lines(spec))
        click.echo(_completeness_lines(spec))
        click.echo(f"\n{len(spec.active_groups)} groups written to {output}")
    else:
        click.echo(spec.to_yaml(), nl=False)
        click.echo(_group_table(spec), err=True)
        click.echo(_kind_lines(spec), err=True)
        click.echo(_completeness_lines(spec), err=True)


@click.command("verify")
@model_options
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False), help="YAML spec to check (default: infer one).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random permutation (and transforms).")
@click.option("--atol", type=float, help="Absolute tolerance (default 1e-8 in float64, 1e-5 with --float32).")
@click.option("--rtol", type=float, help="Relative tolerance (default 1e-6 in float64, 1e-4 with --float32).")
@click.option("--permutations-only", is_flag=True, help="Check random permutations only, whatever kinds the spec declares.")
@click.option("--float32", "float32", is_flag=True,
              help="Compare in the model's own precision instead of float64 (chosen by itself when float64 would not fit in memory).")
def verify_command(model: str, kwargs, input_shape, dtype: str, spec_path: str | None, seed: int, atol: float | None,
                   rtol: float | None, permutations_only: bool, float32: bool) -> None:
    """Check that a random element of each group's kind leaves MODEL's outputs unchanged.

    Every group is permuted at random; groups whose kind is larger (scale, orthogonal,
    invertible) also move by a random transform of that kind.

    A model directory is run with its own weights (random ones if it has none). The comparison
    runs in float64 unless that would not fit in the memory available (a float64 copy of the
    weights and a permuted one, 16 bytes a parameter): then in float32, with the float32
    tolerance printed.
    """
    from autoperm.cli.common import load_spec_or_infer
    from autoperm.verify import TOLERANCES, verify_spec

    args = ModelArgs(model, kwargs, input_shape, dtype)
    module, inputs = args.build(weights=True)
    spec = load_spec_or_infer(spec_path, module, inputs, args.name, args)
    if not float32 and not _float64_fits(module):
        default_atol, default_rtol = TOLERANCES["float32"]
        click.echo(
            f"float64 copies of the weights would need {_float64_bytes(module) / 2**30:.1f} GiB, "
            f"{_available_memory() / 2**30:.1f} GiB are available: comparing in float32, tolerance "
            f"{atol if atol is not None else default_atol:g} + {rtol if rtol is not None else default_rtol:g} x max |output|"
        )
        float32 = True
    report = verify_spec(module, spec, inputs, seed=seed, atol=atol, rtol=rtol, precision="float32" if float32 else "float64",
                         kinds=["permutation"] if permutations_only else None)
    click.echo(f"groups permuted:      {report.groups}")
    if report.kinds:
        click.echo("groups transformed:   " + ", ".join(f"{count} {kind}" for kind, count in sorted(report.kinds.items())))
    click.echo(f"tensors moved:        {report.permuted_tensors}")
    click.echo(f"max abs difference:   {report.max_abs_diff:.3e}")
    click.echo(f"max rel difference:   {report.max_rel_diff:.3e}")
    click.echo(f"tolerance:            {report.tolerance:.3e}")
    if not report.passed and report.failed_groups:
        raise SpecError(
            f"outputs changed under random transforms of the kinds the spec declares (max abs difference "
            f"{report.max_abs_diff:.3e} > {report.tolerance:.3e}): group(s) {', '.join(map(repr, report.failed_groups))} "
            "do not admit their declared kind; set their kind to permutation (or the kind inference gives them)"
        )
    if not report.passed:
        raise SpecError(
            f"outputs changed under a random permutation (max abs difference {report.max_abs_diff:.3e} > "
            f"{report.tolerance:.3e}): the spec is unsound for this model; mark the offending group fixed"
        )
    click.echo("OK: outputs unchanged")


def _float64_bytes(model: nn.Module) -> int:
    """Memory a float64 check adds: a float64 copy of the floating weights and a permuted one."""
    return sum(16 * tensor.numel() for tensor in model.state_dict().values() if tensor.is_floating_point())


def _float64_fits(model: nn.Module) -> bool:
    """Whether the float64 copies fit in the available memory, with a quarter to spare for activations."""
    available = _available_memory()
    return available is None or _float64_bytes(model) * 5 // 4 <= available


def _available_memory() -> int | None:
    """Bytes of memory available to this process (``MemAvailable``, capped by a cgroup v2 limit); ``None`` if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used) if available is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return available


def register(cli: click.Group) -> None:
    cli.add_command(spec_command)
    cli.add_command(verify_command)
