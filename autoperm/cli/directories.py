"""Checkpoint directories in `match` and `merge`: configs checked, stored names followed both ways."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from autoperm.cli.common import ModelArgs
from autoperm.io import load_state_dict
from autoperm.io.directories import Transform
from autoperm.pretrained import (
    StoredNames,
    check_config_file,
    check_names,
    check_same_model,
    load_directory_weights,
    save_directory_weights,
)

__all__ = ["config_mismatch_option", "check_checkpoint_configs", "load_checkpoint", "save_in_stored_names"]

logger = logging.getLogger(__name__)


def config_mismatch_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with ``--allow-config-mismatch``."""
    return click.option(
        "--allow-config-mismatch", is_flag=True,
        help="Accept checkpoint directories whose config.json differs from MODEL's in fields other than the class.",
    )(function)


def check_checkpoint_configs(args: ModelArgs, checkpoints: Sequence[str], allow_config_mismatch: bool) -> None:
    """Check the ``config.json`` of every checkpoint directory before anything is read or written.

    With MODEL a model directory, each other checkpoint directory must have a config naming the
    same class, with the same fields unless ``allow_config_mismatch`` (then the differing fields
    are logged as a warning). With MODEL ``package.module:attr``, a checkpoint directory's
    config, when present, must at least be readable (it is copied into a directory output).

    Raises:
        ModelLoadError: see :func:`autoperm.pretrained.check_same_model` and
            :func:`autoperm.pretrained.check_config_file`.
    """
    reference = args.directory
    for path in checkpoints:
        if not Path(path).is_dir():
            continue
        if reference is None:
            check_config_file(path)
        elif Path(path).resolve() != reference.path.resolve():
            differences = check_same_model(reference, path, allow_config_mismatch)
            if differences:
                logger.warning("config.json of %s differs from %s's in %s (--allow-config-mismatch)",
                               path, reference.path, ", ".join(differences))


def load_checkpoint(
    path: str, module: nn.Module, tied: Iterable[Iterable[str]], model_name: str
) -> tuple[dict[str, torch.Tensor], StoredNames | None]:
    """A checkpoint's tensors under the model's names, and the stored names of a directory.

    A directory's stored names are mapped to the model's as transformers maps them when loading
    (see :mod:`autoperm.pretrained.stored_names`), and must then be exactly the model's; a file
    is read as it is (its names are checked against the spec later).

    Returns:
        ``(state_dict, names)``; ``names`` is ``None`` for a file.

    Raises:
        CheckpointError: the checkpoint cannot be read, or a directory does not hold the model's tensors.
    """
    if not Path(path).is_dir():
        return load_state_dict(path, tied=tied), None
    state_dict, names = load_directory_weights(path, module, tied=tied)
    check_names(state_dict, module, path, model_name)
    return state_dict, names


def save_in_stored_names(
    state_dict: dict[str, torch.Tensor],
    names: StoredNames,
    output: str,
    inputs: Sequence[str],
    transform: Transform | None = None,
) -> None:
    """Write ``state_dict`` (model names) as a directory in the layout of ``names.directory``, under its stored names.

    Converted tensors (mixture-of-experts weights) are written back one model tensor at a time
    (:func:`autoperm.pretrained.save_directory_weights`).

    Args:
        state_dict: tensors keyed by the model's names.
        names: the stored names of the directory whose layout the output follows.
        output: the output directory (must not exist).
        inputs: paths the output must not replace or lie inside.
        transform: ``transform(model name, tensor)`` applied to each tensor as its shard is written.

    Raises:
        CheckpointError: see :func:`autoperm.pretrained.save_directory_weights`.
    """
    save_directory_weights(state_dict, names, output, inputs=inputs, transform=transform)
