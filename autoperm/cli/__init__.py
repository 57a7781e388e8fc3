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
    from autoperm.cli import spec_cmds

    spec_cmds.register(cli)
    for module_name in ("solve_cmds", "eval_cmds"):
        try:
            module = __import__(f"autoperm.cli.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != f"autoperm.cli.{module_name}":
                raise
            continue
        module.register(cli)


_register()


def main() -> None:
    """Console-script entry point."""
    run_cli(cli)
