"""Reading and writing state dicts as ``.pt`` / ``.pth`` / ``.bin`` (torch) or ``.safetensors``.

Reading never unpickles arbitrary objects (``torch.load(weights_only=True)``); writing goes
through a temporary file and a rename, and refuses to replace a file given as an input.
A directory written by ``save_pretrained`` (Hugging Face or diffusers, sharded or not) is read
through :mod:`autoperm.pretrained.shards`.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from autoperm.errors import CheckpointError

__all__ = ["load_state_dict", "save_state_dict", "read_torch_file"]

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
        from autoperm.pretrained.shards import load_directory

        return load_directory(path, tied)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path))
        except Exception as error:  # safetensors raises its own types for corrupt files
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: not a valid safetensors file ({error})") from error
        return _unwrap(loaded, str(path))
    return _unwrap(read_torch_file(path), str(path))


def read_torch_file(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` (memory-mapped where the format allows it).

    Raises:
        CheckpointError: a short message: the file is corrupt or not a torch file, or it holds
            Python objects other than tensors and plain containers (named; such files are
            refused, never unpickled).
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: it holds Python objects other than tensors{what}, which "
            "autoperm does not unpickle; save the model's state_dict() (torch.save or safetensors) instead"
        ) from None
    except Exception as error:  # torch raises many types for corrupt files
        first = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: not a readable torch checkpoint ({first}); "
            "autoperm reads state dicts saved with torch.save or safetensors"
        ) from None


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
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; follow the umask like other outputs
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot write {str(path)!r}: {error}") from error
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
