"""Checkpoint directories as Hugging Face and diffusers write them: single files or shards.

A ``save_pretrained`` directory holds its weights as one of

* ``model.safetensors`` or shards listed in ``model.safetensors.index.json``;
* ``diffusion_pytorch_model.safetensors`` (diffusers), possibly sharded the same way;
* legacy ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin``, possibly sharded
  (``pytorch_model.bin.index.json``).

Reading is lazy: safetensors tensors are memory-mapped views of the files, torch shards are
loaded with ``torch.load(mmap=True, weights_only=True)``; nothing is copied until a tensor is
used. Writing follows the source layout file by file (same shard names, same keys in each shard,
so the same shard size), one shard in memory at a time, into a temporary directory that is
renamed at the end (:func:`autoperm.io.atomic.atomic_directory`); the other files of the
directory (config, tokenizer, ...) are copied.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from autoperm.errors import CheckpointError
from autoperm.io.atomic import atomic_directory
from autoperm.io.formats import (
    read_torch_file,
    safetensors_dtypes,
    safetensors_keys,
    safetensors_metadata,
)
from autoperm.io.memory_map import write_safetensors

__all__ = ["CheckpointLayout", "Transform", "find_layout", "is_checkpoint_directory", "load_directory", "save_directory"]

logger = logging.getLogger(__name__)

# (weights file, its index, format), in the order they are looked for
_CANDIDATES: tuple[tuple[str, str, str], ...] = (
    ("model.safetensors", "model.safetensors.index.json", "safetensors"),
    ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json", "safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "torch"),
    ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json", "torch"),
)

Transform = Callable[[str, torch.Tensor], torch.Tensor]
"""Called with a tensor's name and the tensor, returns the tensor to write in its place."""


@dataclass(frozen=True)
class CheckpointLayout:
    """Where the weights of a checkpoint directory live.

    Attributes:
        directory: the checkpoint directory.
        format: ``"safetensors"`` or ``"torch"``.
        shards: ``{file name: [tensor names in that file]}``, in file order.
        index: name of the index file (``None`` for a single unsharded file).
        index_data: the parsed index (its ``metadata`` is kept when rewriting).
    """

    directory: Path
    format: str
    shards: dict[str, list[str]]
    index: str | None = None
    index_data: dict | None = None

    @property
    def weight_files(self) -> set[str]:
        """File names that hold weights (shards and index)."""
        return set(self.shards) | ({self.index} if self.index else set())

    @property
    def keys(self) -> list[str]:
        """Every tensor name of the layout, shard by shard in file order."""
        return [key for names in self.shards.values() for key in names]


def is_checkpoint_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding weights in one of the known layouts."""
    path = Path(path)
    return path.is_dir() and any((path / f).is_file() or (path / i).is_file() for f, i, _ in _CANDIDATES)


def find_layout(directory: str | os.PathLike[str]) -> CheckpointLayout:
    """Find and check the weights of a ``save_pretrained`` directory.

    Args:
        directory: the checkpoint directory.

    Returns:
        Its :class:`CheckpointLayout`; every shard the index lists exists and holds the tensors
        the index assigns to it (checked from the safetensors headers, without reading data).

    Raises:
        CheckpointError: no known weights file, an unreadable index, or shards missing or
            lacking tensors the index lists.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    for weights, index, kind in _CANDIDATES:
        if (directory / index).is_file():
            return _sharded_layout(directory, index, kind)
        if (directory / weights).is_file():
            return CheckpointLayout(directory, kind, {weights: _keys_of(directory / weights, kind)})
    expected = ", ".join(f for f, _, _ in _CANDIDATES)
    raise CheckpointError(
        f"checkpoint directory {str(directory)!r} holds no weights: expected one of {expected} "
        "or a sharded index (*.index.json) as save_pretrained writes them"
    )


def _sharded_layout(directory: Path, index: str, kind: str) -> CheckpointLayout:
    where = str(directory / index)
    try:
        data = json.loads((directory / index).read_text())
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read the shard index {where!r}: {type(error).__name__}: {error}") from error
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"shard index {where!r}: 'weight_map' must map tensor names to shard file names")
    shards: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        shards.setdefault(file, []).append(key)
    missing = [file for file in shards if not (directory / file).is_file()]
    if missing:
        raise CheckpointError(
            f"shard index {where!r} lists {len(missing)} shard file(s) that are not in the directory: "
            f"{missing[:3]}; the download or copy is incomplete"
        )
    if kind == "safetensors":
        for file, keys in shards.items():
            present = set(safetensors_keys(directory / file))
            absent = [key for key in keys if key not in present]
            if absent:
                raise CheckpointError(
                    f"shard {str(directory / file)!r} lacks {len(absent)} tensor(s) that {index} assigns to it, "
                    f"e.g. {absent[:3]}"
                )
    return CheckpointLayout(directory, kind, shards, index, data)


def _keys_of(path: Path, kind: str) -> list[str]:
    if kind == "safetensors":
        return safetensors_keys(path)
    return list(read_torch_file(path))


def load_directory(
    directory: str | os.PathLike[str], tied: Iterable[Iterable[str]] = ()
) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint directory lazily (memory-mapped, nothing copied).

    Args:
        directory: a ``save_pretrained`` directory (see the module docstring for layouts).
        tied: groups of state-dict names that share one tensor in the model (tied embeddings);
            a name missing from the files is filled in with its tied partner, as
            ``save_pretrained`` stores a tied tensor once.

    Returns:
        ``{name: tensor}``; safetensors tensors are read-only memory maps of the files.

    Raises:
        CheckpointError: see :func:`find_layout`; or a file cannot be read.
    """
    layout = find_layout(directory)
    tensors: dict[str, torch.Tensor] = {}
    for file, keys in layout.shards.items():
        path = layout.directory / file
        if layout.format == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in keys:
                        tensors[key] = handle.get_tensor(key)
            except Exception as error:  # corrupt data section
                raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {error}") from error
        else:
            loaded = read_torch_file(path)
            absent = [key for key in keys if key not in loaded]
            if absent:
                raise CheckpointError(f"shard {str(path)!r} lacks {len(absent)} tensor(s) its index lists, e.g. {absent[:3]}")
            tensors.update({key: loaded[key] for key in keys})
    for names in tied:
        names = list(names)
        present = [name for name in names if name in tensors]
        if present:
            for name in names:
                if name not in tensors:
                    tensors[name] = tensors[present[0]]
    return tensors


def save_directory(
    state_dict: Mapping[str, torch.Tensor],
    layout: CheckpointLayout,
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    transform: Transform | None = None,
) -> None:
    """Write ``state_dict`` as a directory in ``layout``'s format, atomically.

    The other files of ``layout.directory`` (config, tokenizer, generation config, ...) are
    copied; each shard gets the same tensors as in the source (cast to the source's dtype), so
    shard sizes and the index stay the same, and a tensor stored once for tied weights is
    written once. Shards are written one at a time, ``transform(name, tensor)`` being applied to
    each tensor as its shard is written (so a permutation needs one shard of extra memory).
    Files and folders get the modes the umask gives new ones.

    Args:
        state_dict: ``{name: tensor}`` holding at least every tensor of the layout.
        layout: the layout to follow (usually that of the checkpoint the output derives from).
        output: the output directory; it must not exist yet.
        inputs: paths the output must not replace.
        transform: optional ``(name, tensor) -> tensor`` applied while writing.

    Raises:
        CheckpointError: ``output`` exists or is an input, a tensor is missing, or writing fails;
            nothing is left behind.
    """
    output = Path(output)
    resolved = output.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if source_path == resolved or source_path in resolved.parents:
            raise CheckpointError(f"refusing to write {str(output)!r}: it is (inside) the input {str(source)!r}")
    if output.exists():
        raise CheckpointError(f"output {str(output)!r} already exists; remove it or choose another path")
    missing = [key for key in layout.keys if key not in state_dict]
    if missing:
        raise CheckpointError(f"cannot write {str(output)!r}: the state dict lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    try:
        with atomic_directory(output) as temporary:
            _copy_other_files(layout, temporary)
            total = 0
            for file, keys in layout.shards.items():
                total += _write_shard(layout, file, keys, state_dict, transform, temporary / file)
            if layout.index:
                data = dict(layout.index_data or {})
                metadata = dict(data.get("metadata") or {})
                metadata["total_size"] = total
                data["metadata"] = metadata
                (temporary / layout.index).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as error:
        raise CheckpointError(f"cannot write {str(output)!r}: {error}") from error
    logger.info("wrote %s (%d file(s) of weights, %d bytes)", output, len(layout.shards), total)


def _copy_other_files(layout: CheckpointLayout, target: Path) -> None:
    skip = layout.weight_files
    for child in layout.directory.iterdir():
        if child.name in skip or child.name.startswith("."):
            continue
        if child.is_dir():
            shutil.copytree(child, target / child.name)
        elif child.is_file():
            shutil.copy2(child, target / child.name)


def _write_shard(
    layout: CheckpointLayout,
    file: str,
    keys: list[str],
    state_dict: Mapping[str, torch.Tensor],
    transform: Transform | None,
    path: Path,
) -> int:
    """Write one shard, in the source's dtypes; returns its number of tensor bytes.

    A safetensors shard is written one tensor at a time (:func:`autoperm.io.memory_map.write_safetensors`),
    so writing needs the memory of its largest tensor, not of the shard (a diffusers UNet is one
    shard of several GB); a torch shard is built whole, as ``torch.save`` needs it.
    """
    source = _source_dtypes(layout, file, keys)

    def produce(key: str) -> torch.Tensor:
        tensor = state_dict[key]
        if transform is not None:
            tensor = transform(key, tensor)
        return tensor.detach().to(device="cpu", dtype=source.get(key, tensor.dtype)).contiguous()

    if layout.format == "safetensors":
        shapes = {key: (tuple(state_dict[key].shape), source.get(key, state_dict[key].dtype)) for key in keys}
        metadata = safetensors_metadata(layout.directory / file)
        metadata.setdefault("format", "pt")  # transformers refuses safetensors files without it
        write_safetensors(path, shapes, produce, metadata=metadata)
        return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in shapes.values())
    tensors = {key: produce(key) for key in keys}
    torch.save(tensors, path)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _source_dtypes(layout: CheckpointLayout, file: str, keys: list[str]) -> dict[str, torch.dtype]:
    """The dtype each tensor has in the source shard (outputs keep it)."""
    path = layout.directory / file
    if layout.format == "safetensors":
        return safetensors_dtypes(path, keys)
    loaded = read_torch_file(path)
    return {key: loaded[key].dtype for key in keys if key in loaded}
