"""State dicts by path: one loader that dispatches on the format, one saver.

A path is read as a ``save_pretrained`` directory (:mod:`autoperm.io.directories`), a
``.safetensors`` file, or a torch checkpoint (``.pt`` / ``.pth`` / ``.bin``, read with
``weights_only``); the rest of autoperm asks for a state dict by path and never opens a file.
Writing goes through :func:`autoperm.io.atomic.atomic_file` and refuses to replace a file given
as an input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from autoperm.errors import CheckpointError
from autoperm.io.atomic import atomic_file
from autoperm.io.directories import load_directory
from autoperm.io.formats import read_safetensors_file, read_torch_file

__all__ = ["load_state_dict", "save_state_dict"]

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_state_dict(
    path: str | os.PathLike[str], tied: Iterable[Iterable[str]] = ()
) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file, a torch checkpoint, or a model directory.

    A torch checkpoint holding the state dict under ``state_dict``, ``model``,
    ``model_state_dict`` or ``module`` (as training scripts save it) is unwrapped, and the log
    says so. A directory written by ``save_pretrained`` (``model.safetensors``, shards with an
    index, ``diffusion_pytorch_model.safetensors``, legacy ``pytorch_model.bin`` shards) is read
    lazily: its tensors are memory-mapped, not copied.

    Args:
        path: the checkpoint file or directory.
        tied: for directories, groups of names sharing one tensor in the model (tied
            embeddings); names ``save_pretrained`` left out are filled in from their partner.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no state dict of tensors.

    Example:
        >>> sd = load_state_dict("model_a.pt")
        >>> sd = load_state_dict("llama-a/")          # sharded safetensors + index
    """
    path = Path(path)
    if path.is_dir():
        return load_directory(path, tied)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _unwrap(read_safetensors_file(path), str(path))
    return _unwrap(read_torch_file(path), str(path))


def _unwrap(loaded: object, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"checkpoint {where!r} holds a {type(loaded).__name__}, not a state dict")
    if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return dict(loaded)
    for key in _WRAPPER_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            logger.info("checkpoint %s: using the state dict stored under %r", where, key)
            return dict(inner)
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)][:5]
    raise CheckpointError(
        f"checkpoint {where!r} is not a state dict of tensors (entries {not_tensors} are not tensors) "
        f"and has no state dict under any of {list(_WRAPPER_KEYS)}"
    )


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Write a state dict atomically, as safetensors if ``path`` ends in ``.safetensors``.

    The file gets the mode the umask gives new files.

    Args:
        state_dict: ``{name: tensor}`` to write (tensors are copied to the CPU).
        path: the output file; its folder is created if needed.
        inputs: files the output must not replace (the checkpoints it was computed from).

    Raises:
        CheckpointError: ``path`` is one of ``inputs``, or the file cannot be written.
    """
    path = Path(path)
    for source in inputs:
        if Path(source).resolve() == path.resolve():
            raise CheckpointError(f"refusing to overwrite input file {str(path)!r}; choose another output path")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    try:
        with atomic_file(path) as temporary:
            if path.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({k: v.clone() for k, v in tensors.items()}, str(temporary))
            else:
                torch.save(tensors, temporary)
    except OSError as error:
        raise CheckpointError(f"cannot write {str(path)!r}: {error}") from error
