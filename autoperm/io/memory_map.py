"""Memory-mapped safetensors for the solvers: weights read in place, written one tensor at a time.

Weight matching of billion-parameter models must not hold copies of both models: its inputs
are only read. :func:`mmap_safetensors` maps a ``.safetensors`` file privately (copy-on-write,
``MAP_PRIVATE``) and returns tensors that view the mapping, so nothing is read until a tensor is
used, pages are shared with the page cache, and nothing written to a tensor can reach the
file. :func:`write_safetensors` writes a file from a producer called once per tensor, so a
checkpoint larger than memory can be created (the benchmark's planted models), atomically
(:func:`autoperm.io.atomic.atomic_file`).

The file format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets
relative to the end of the header), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from autoperm.errors import CheckpointError
from autoperm.io.atomic import atomic_file
from autoperm.io.formats import SAFETENSORS_DTYPES

__all__ = ["TensorProducer", "mmap_safetensors", "unmap_large_allocations", "write_safetensors"]

_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def mmap_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Map a ``.safetensors`` file and return its tensors as views of the mapping (no copy).

    Args:
        path: the file; it is opened read-only and never modified (the mapping is private).

    Returns:
        ``{name: tensor}`` in file order. The tensors keep the mapping alive; writing to one
        changes only this process's copy of the page.

    Raises:
        CheckpointError: the file cannot be read, its header is invalid, a tensor's bytes
            lie outside the file or do not match its shape, or its dtype is not supported.

    Example:
        >>> sd_a = mmap_safetensors("a.safetensors")
        >>> res = weight_matching(spec, sd_a, mmap_safetensors("b.safetensors"))
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if 8 + header_length > size:
                raise CheckpointError(f"{path}: header length {header_length} runs past the end of the file")
            header = json.loads(handle.read(header_length))
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + header_length else None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON: {error}") from error
    start = 8 + header_length
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid or unsupported header entry {entry!r}") from error
        count = 1
        for s in shape:
            count *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if start + end > size and end - begin == count * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {start + end} but the file has {size} bytes: the file is "
                "truncated (an incomplete download or copy)"
            )
        if end - begin != count * itemsize or start + end > size or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {[begin, end]} that do not fit shape {shape}")
        if count == 0 or mapping is None:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(mapping, dtype=dtype, count=count, offset=start + begin).view(shape)
    return tensors


TensorProducer = Callable[[str], torch.Tensor]
"""Called with a tensor's name, returns the tensor to write (of the announced shape and dtype)."""


def write_safetensors(
    path: str | os.PathLike[str],
    layout: Mapping[str, tuple[Sequence[int], torch.dtype]],
    produce: TensorProducer,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a ``.safetensors`` file one tensor at a time, atomically.

    The file gets the mode the umask gives new files, as every output of autoperm does.

    Args:
        path: the file to create (replaced only once it is complete; its folder is created
            if needed).
        layout: ``{name: (shape, dtype)}`` of every tensor, in file order.
        produce: called once per name, in order; only one produced tensor is alive at a time.
        metadata: the header's ``__metadata__`` (string to string), if any.

    Raises:
        CheckpointError: a produced tensor does not have its announced shape or dtype, or
            a dtype cannot be stored.
        OSError: the file cannot be written; nothing is left behind.
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in layout.items():
        if dtype not in _NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors files here do not store")
        count = 1
        for s in shape:
            count *= int(s)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps every tensor 8-byte aligned
    with atomic_file(path) as temporary, open(temporary, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, (shape, dtype) in layout.items():
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(
                    f"{path}: tensor {name!r} was produced with shape {list(tensor.shape)} and dtype {tensor.dtype}, "
                    f"announced {list(shape)} and {dtype}"
                )
            data = tensor.detach().cpu().contiguous().reshape(-1)
            out.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
            del tensor, data  # freed before the next tensor is produced


_M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter for the size from which an allocation gets its own mapping."""

LARGE_ALLOCATION_BYTES = 4 << 20
"""The default of :func:`unmap_large_allocations`: the cost products' slices and blocks are larger
(4-32 MB); the buffers of inner products (2 MiB) stay below, so the allocator reuses them."""


def unmap_large_allocations(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Give every allocation of at least ``threshold`` bytes its own mapping, returned to the system when freed.

    glibc's malloc raises this threshold as mapped buffers are freed (up to 32 MiB), after which
    the buffers of the cost products' slices (4-17 MB each) come from the heap; freed, they stay
    in the process, and the heap grows in pieces it cannot give back while products are cached in
    between. On a 0.5B-parameter bfloat16 pair that was 0.3 GiB of peak resident memory. A fixed
    threshold keeps the peak at the weights plus the buffers in use, at the price of fresh zero
    pages for each large buffer (system time). Process-wide and permanent: the command-line
    program sets it once at start; a library caller may choose to.

    Args:
        threshold: the size in bytes from which allocations are mapped on their own.

    Returns:
        Whether the setting was applied (``False`` where the C library is not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = library.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
