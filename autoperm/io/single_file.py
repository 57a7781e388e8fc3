"""Single-file checkpoints read lazily and written back in their own format, one tensor at a time.

A ``.safetensors`` file is memory-mapped (:func:`autoperm.io.memory_map.mmap_safetensors`),
so nothing is read until a tensor is used, and written back with the same tensor names, order,
dtypes and header metadata, one tensor in memory at a time. A torch file (``.ckpt``, ``.pt``,
``.pth``, ``.bin``) is read with ``weights_only``; when it holds its tensors under
``state_dict`` (as training scripts such as the original Stable Diffusion save them), the other
entries (``global_step``, ...) are written back unchanged around the new state dict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoperm.errors import CheckpointError
from autoperm.io.atomic import atomic_file
from autoperm.io.directories import Transform
from autoperm.io.formats import read_torch_file, safetensors_metadata
from autoperm.io.memory_map import mmap_safetensors, write_safetensors

__all__ = ["SINGLE_FILE_SUFFIXES", "SingleFileLayout", "read_single_file", "save_single_file"]

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
"""File name endings read as single-file checkpoints."""

_STATE_DICT_KEY = "state_dict"


@dataclass(frozen=True)
class SingleFileLayout:
    """How a single-file checkpoint stores its tensors, enough to write another one like it.

    Attributes:
        path: the file.
        format: ``"safetensors"`` or ``"torch"``.
        shapes: ``{name: shape}`` in file order.
        dtypes: ``{name: dtype}``.
        metadata: the safetensors header's ``__metadata__`` (empty for torch files).
        outer: for a torch file holding its tensors under ``state_dict``, the other entries of
            the file (written back unchanged); ``None`` when the tensors are the whole file.
    """

    path: Path
    format: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    metadata: dict[str, str] = field(default_factory=dict)
    outer: dict[str, object] | None = field(default=None, repr=False)

    @property
    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self.shapes)


def read_single_file(path: str | os.PathLike[str]) -> tuple[SingleFileLayout, dict[str, torch.Tensor]]:
    """Read a single-file checkpoint lazily: its layout and its tensors.

    Args:
        path: a ``.safetensors`` file, or a torch file (``.ckpt``, ``.pt``, ``.pth``, ``.bin``).

    Returns:
        ``(layout, tensors)``; safetensors tensors are read-only views of a private memory map
        of the file, torch tensors are memory-mapped where the format allows it.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds no state dict of
            tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        tensors = mmap_safetensors(path)
        try:
            metadata = safetensors_metadata(path)
        except Exception as error:  # safetensors raises its own types on corrupt headers
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {error}") from error
        return _layout(path, "safetensors", tensors, metadata, None), tensors
    loaded = read_torch_file(path)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(loaded).__name__}, not a state dict")
    outer: dict[str, object] | None = None
    inner = loaded.get(_STATE_DICT_KEY)
    if isinstance(inner, Mapping):
        outer = {key: value for key, value in loaded.items() if key != _STATE_DICT_KEY}
        loaded = inner
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not loaded or not_tensors:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a state dict of tensors (entries {not_tensors[:5]} are not tensors)"
        )
    tensors = dict(loaded)
    return _layout(path, "torch", tensors, {}, outer), tensors


def _layout(
    path: Path, kind: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], outer: dict[str, object] | None
) -> SingleFileLayout:
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    dtypes = {name: tensor.dtype for name, tensor in tensors.items()}
    return SingleFileLayout(path, kind, shapes, dtypes, metadata, outer)


def save_single_file(
    tensors: Mapping[str, torch.Tensor],
    layout: SingleFileLayout,
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    transform: Transform | None = None,
) -> None:
    """Write ``tensors`` as one file in ``layout``'s format, names, order and dtypes, atomically.

    Safetensors files are written one tensor at a time (``transform(name, tensor)`` applied as
    each is written, so a permutation needs one tensor of extra memory) with the source's header
    metadata; torch files are written whole, around the source's other entries.

    Args:
        tensors: ``{name: tensor}`` holding at least every tensor of the layout.
        layout: the layout to follow (that of the checkpoint the output derives from).
        output: the file to create; it must not exist yet.
        inputs: files the output must not replace.
        transform: optional ``(name, tensor) -> tensor`` applied while writing.

    Raises:
        CheckpointError: ``output`` exists or is an input, a tensor is missing or changes shape,
            or writing fails; nothing is left behind.
    """
    output = Path(output)
    for source in inputs:
        if Path(source).resolve() == output.resolve():
            raise CheckpointError(f"refusing to overwrite input file {str(output)!r}; choose another output path")
    if output.exists():
        raise CheckpointError(f"output {str(output)!r} already exists; remove it or choose another path")
    missing = [key for key in layout.keys if key not in tensors]
    if missing:
        raise CheckpointError(f"cannot write {str(output)!r}: {len(missing)} tensor(s) are missing, e.g. {missing[:3]}")

    def produce(name: str) -> torch.Tensor:
        tensor = tensors[name] if transform is None else transform(name, tensors[name])
        if tuple(tensor.shape) != layout.shapes[name]:
            raise CheckpointError(
                f"cannot write {str(output)!r}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"the source {list(layout.shapes[name])}"
            )
        return tensor.detach().to(device="cpu", dtype=layout.dtypes[name])

    try:
        if layout.format == "safetensors":
            shapes = {name: (layout.shapes[name], layout.dtypes[name]) for name in layout.keys}
            write_safetensors(output, shapes, produce, metadata=layout.metadata)
        else:
            state_dict = {name: produce(name).contiguous() for name in layout.keys}
            content = state_dict if layout.outer is None else {**layout.outer, _STATE_DICT_KEY: state_dict}
            with atomic_file(output) as temporary:
                torch.save(content, temporary)
    except OSError as error:
        raise CheckpointError(f"cannot write {str(output)!r}: {error}") from error
    logger.info("wrote %s (%d tensors, %s)", output, len(layout.keys), layout.format)
