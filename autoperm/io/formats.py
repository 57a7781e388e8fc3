"""Single weights files: torch pickles read with ``weights_only``, safetensors headers and data.

Torch files are read with ``torch.load(weights_only=True)`` (memory-mapped where the format
allows it), so arbitrary Python objects are never unpickled. Safetensors files are read through
the ``safetensors`` library; their headers (names, dtypes, metadata) are read without reading
tensor data.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from autoperm.errors import AutopermError, CheckpointError

__all__ = [
    "SAFETENSORS_DTYPES",
    "read_json_object",
    "read_safetensors_file",
    "read_torch_file",
    "safetensors_dtypes",
    "safetensors_keys",
    "safetensors_metadata",
]

def read_json_object(path: Path, error: type[AutopermError] = CheckpointError) -> dict[str, Any]:
    """The JSON object in ``path`` (a config, an index).

    Raises:
        AutopermError: of type ``error``, naming the file, when it cannot be read or holds no object.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as cause:
        raise error(f"cannot read {str(path)!r}: {cause}") from cause
    if not isinstance(data, dict):
        raise error(f"{str(path)!r} is not a JSON object")
    return data


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
"""The safetensors dtype names autoperm reads and writes, and their torch dtypes."""


def read_torch_file(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` (memory-mapped where the format allows it).

    Args:
        path: a file written by ``torch.save``.

    Returns:
        What the file holds (tensors and plain containers only), on the CPU.

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


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, on the CPU.

    Raises:
        CheckpointError: the file is not a valid safetensors file.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: not a valid safetensors file ({error})") from error


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a ``.safetensors`` file, in file order, read from its header only.

    Raises:
        CheckpointError: the header cannot be read.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error types on corrupt headers
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {error}") from error


def safetensors_dtypes(path: Path, keys: list[str]) -> dict[str, torch.dtype]:
    """The torch dtype each of ``keys`` has in a ``.safetensors`` file (those it can map), from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = {key: handle.get_slice(key).get_dtype() for key in keys}
    return {key: SAFETENSORS_DTYPES[name] for key, name in names.items() if name in SAFETENSORS_DTYPES}


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file's header (empty if it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
