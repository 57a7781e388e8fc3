"""Reading and writing state dicts as ``.pt`` / ``.pth`` / ``.bin`` (torch) or ``.safetensors``.

Reading never unpickles arbitrary objects (``torch.load(weights_only=True)``); writing goes
through a temporary file and a rename, and refuses to replace a file given as an input.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from autoperm.errors import CheckpointError

__all__ = ["load_state_dict", "save_state_dict"]

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file or a torch checkpoint.

    A torch checkpoint holding the state dict under ``state_dict``, ``model``,
    ``model_state_dict`` or ``module`` (as training scripts save it) is unwrapped, and the log
    says so.

    Args:
        path: the checkpoint file.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no state dict of tensors.

    Example:
        >>> sd = load_state_dict("model_a.pt")
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for corrupt files
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: {type(error).__name__}: {error}. "
            "autoperm reads state dicts saved with torch.save (.pt) or safetensors (.safetensors)."
        ) from error
    return _unwrap(loaded, str(path))


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
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
    except OSError as error:
        raise CheckpointError(f"cannot write {str(path)!r}: {error.strerror}") from error
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.clone() for k, v in tensors.items()}, temporary)
        else:
            torch.save(tensors, temporary)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot write {str(path)!r}: {error}") from error
        raise
