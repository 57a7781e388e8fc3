"""Model directories for the directory tests: the CLI invoked in-process, and planted pairs."""

from __future__ import annotations

import warnings
from pathlib import Path

from click.testing import CliRunner, Result
from torch import nn

from autoperm import apply_permutation, random_permutation
from autoperm.cli import cli
from autoperm.spec import PermutationSpec


def invoke(args: list[str]) -> Result:
    """Run ``autoperm ARGS`` in this process, warnings silenced, exceptions kept on the result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(cli, args, standalone_mode=False, catch_exceptions=True)


def planted_pair(model: nn.Module, base: Path, shard_size: str = "40KB") -> dict[str, Path]:
    """Save ``model`` as directory ``a`` and, permuted by its spec (seed 5), as ``b`` (sharded).

    The spec comes from ``autoperm spec`` on ``a`` and is kept as ``spec.yaml``; ``model`` ends up
    holding B's weights. Returns the paths under ``"a"``, ``"b"`` and ``"spec"``.
    """
    paths = {"a": base / "a", "b": base / "b", "spec": base / "spec.yaml"}
    model.save_pretrained(paths["a"], max_shard_size=shard_size)
    result = invoke(["spec", str(paths["a"]), "-o", str(paths["spec"])])
    assert result.exception is None, result.output
    spec = PermutationSpec.from_yaml(paths["spec"])
    model.load_state_dict(apply_permutation(spec, random_permutation(spec, seed=5), model.state_dict()))
    model.save_pretrained(paths["b"], max_shard_size=shard_size)
    return paths
