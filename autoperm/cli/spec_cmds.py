"""`autoperm spec` and `autoperm verify`."""

from __future__ import annotations


import click

from autoperm.cli.common import build_model, model_options
from autoperm.errors import SpecError

__all__ = ["register"]


def _group_table(spec) -> str:
    rows = [("group", "size", "members", "note")]
    for group in spec.groups:
        note = "fixed" if group.fixed else (f"per {group.per}" if group.per else "")
        rows.append((group.name, str(group.size), str(len(group.members)), note))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
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
    """Infer the permutation groups of MODEL (package.module:attr) and write them as YAML."""
    from autoperm.infer import infer_spec

    module, inputs = build_model(model, kwargs, input_shape, dtype)
    spec = infer_spec(module, inputs, tracer=tracer, model_name=model)
    if output:
        spec.to_yaml(output)
        click.echo(_group_table(spec), err=False)
        click.echo(_completeness_lines(spec))
        click.echo(f"\n{len(spec.active_groups)} groups written to {output}")
    else:
        click.echo(spec.to_yaml(), nl=False)
        click.echo(_group_table(spec), err=True)
        click.echo(_completeness_lines(spec), err=True)


@click.command("verify")
@model_options
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False), help="YAML spec to check (default: infer one).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random permutation.")
@click.option("--atol", type=float, help="Absolute tolerance (default 1e-8 in float64, 1e-5 with --float32).")
@click.option("--rtol", type=float, help="Relative tolerance (default 1e-6 in float64, 1e-4 with --float32).")
@click.option("--float32", "float32", is_flag=True, help="Compare in the model's own precision instead of float64.")
def verify_command(model: str, kwargs, input_shape, dtype: str, spec_path: str | None, seed: int, atol: float | None,
                   rtol: float | None, float32: bool) -> None:
    """Check that a random permutation from the spec leaves MODEL's outputs unchanged."""
    from autoperm.cli.common import load_spec_or_infer
    from autoperm.verify import verify_spec

    module, inputs = build_model(model, kwargs, input_shape, dtype)
    spec = load_spec_or_infer(spec_path, module, inputs, model)
    report = verify_spec(module, spec, inputs, seed=seed, atol=atol, rtol=rtol, precision="float32" if float32 else "float64")
    click.echo(f"groups permuted:      {report.groups}")
    click.echo(f"tensors moved:        {report.permuted_tensors}")
    click.echo(f"max abs difference:   {report.max_abs_diff:.3e}")
    click.echo(f"max rel difference:   {report.max_rel_diff:.3e}")
    click.echo(f"tolerance:            {report.tolerance:.3e}")
    if not report.passed:
        raise SpecError(
            f"outputs changed under a random permutation (max abs difference {report.max_abs_diff:.3e} > "
            f"{report.tolerance:.3e}): the spec is unsound for this model; mark the offending group fixed"
        )
    click.echo("OK: outputs unchanged")


def register(cli: click.Group) -> None:
    cli.add_command(spec_command)
    cli.add_command(verify_command)
