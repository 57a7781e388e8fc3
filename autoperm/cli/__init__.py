"""The `autoperm` command line: each command reads its inputs, calls one library function, reports."""

from __future__ import annotations

import click

from autoperm.cli.common import run_cli

__all__ = ["main", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="autoperm")
def cli() -> None:
    """Find permutation symmetries of PyTorch models; align, compare and merge trained models."""


def _register() -> None:
    from autoperm.cli import eval_cmds, solve_cmds, spec_cmds

    for module in (spec_cmds, solve_cmds, eval_cmds):
        module.register(cli)


_register()


def main() -> None:
    """Console-script entry point."""
    run_cli(cli)
