"""Stable Diffusion as its community keeps it: LDM single files and diffusers pipeline folders.

A single file in the original LDM layout (``.safetensors`` or ``.ckpt``) holds the whole model:
the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text
encoder(s) under ``cond_stage_model.`` (SD 1.x / 2.x) or ``conditioner.`` (SDXL), sometimes an
EMA copy of the UNet under ``model_ema.``. A pipeline folder (``save_pretrained`` of a diffusers
pipeline) has ``model_index.json`` and one folder per component: ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ...

Only the UNet is aligned; the other components share no permutation with its hidden units (the
VAE meets it at the latent channels, the text encoders at the context width, both fixed), so
they are copied unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from autoperm.errors import CheckpointError
from autoperm.io.atomic import atomic_directory
from autoperm.io.directories import Transform, find_layout, save_directory
from autoperm.io.formats import read_json_object
from autoperm.io.single_file import SINGLE_FILE_SUFFIXES, SingleFileLayout, read_single_file

__all__ = [
    "PIPELINE_INDEX",
    "UNET_PREFIX",
    "StableDiffusionFile",
    "component_counts",
    "is_pipeline_directory",
    "is_single_file",
    "pipeline_unet",
    "read_stable_diffusion_file",
    "save_pipeline",
]

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
"""The prefix of the UNet's tensors in an LDM single file."""

PIPELINE_INDEX = "model_index.json"
"""The file that makes a folder a diffusers pipeline."""

_COMPONENTS: tuple[tuple[str, str], ...] = (
    (UNET_PREFIX, "UNet"),
    ("first_stage_model.", "VAE"),
    ("cond_stage_model.", "text encoder"),
    ("conditioner.", "text encoders"),
    ("model_ema.", "EMA copy of the UNet"),
)


@dataclass(frozen=True)
class StableDiffusionFile:
    """An LDM single-file checkpoint, read lazily.

    Attributes:
        layout: how the file stores its tensors (written back the same way).
        tensors: every tensor of the file, ``{stored name: tensor}``.
    """

    layout: SingleFileLayout
    tensors: dict[str, torch.Tensor]

    @property
    def unet(self) -> dict[str, torch.Tensor]:
        """The UNet's tensors, under their stored names (``model.diffusion_model.*``)."""
        return {name: tensor for name, tensor in self.tensors.items() if name.startswith(UNET_PREFIX)}

    @property
    def path(self) -> Path:
        """The file."""
        return self.layout.path


def is_single_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file with a checkpoint's ending (``.safetensors``, ``.ckpt``, ``.pt``, ...)."""
    path = Path(path)
    return path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES


def is_pipeline_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (it has ``model_index.json``)."""
    return (Path(path) / PIPELINE_INDEX).is_file()


def component_counts(names: Iterable[str]) -> dict[str, int]:
    """How many tensors each component of an LDM file has: ``{"UNet": n, "VAE": n, ..., "other": n}``."""
    counts: dict[str, int] = {}
    for name in names:
        component = next((label for prefix, label in _COMPONENTS if name.startswith(prefix)), "other")
        counts[component] = counts.get(component, 0) + 1
    return counts


def read_stable_diffusion_file(path: str | os.PathLike[str]) -> StableDiffusionFile:
    """Read an LDM single-file Stable Diffusion checkpoint lazily.

    Args:
        path: a ``.safetensors`` or ``.ckpt`` file in the original LDM layout.

    Returns:
        The file's layout and memory-mapped tensors.

    Raises:
        CheckpointError: the file cannot be read, or it is a single file of an unknown layout
            (no ``model.diffusion_model.*`` tensors).
    """
    path = Path(path)
    layout, tensors = read_single_file(path)
    _check_unet_prefix(path, layout.keys)
    return StableDiffusionFile(layout, tensors)


def _check_unet_prefix(path: Path, names: list[str]) -> None:
    if any(name.startswith(UNET_PREFIX) for name in names):
        return
    raise CheckpointError(
        f"{str(path)!r} is a single file of an unknown layout: no tensor is named {UNET_PREFIX}* (the UNet of a "
        f"Stable Diffusion checkpoint in the original LDM layout), e.g. it has {names[:3]}; for a plain state dict "
        "give the model first: autoperm match MODEL A B"
    )


def pipeline_unet(directory: str | os.PathLike[str]) -> Path:
    """The UNet folder of a diffusers pipeline, checked.

    Args:
        directory: a pipeline folder (``model_index.json``).

    Returns:
        The folder ``model_index.json`` names for the ``unet`` component.

    Raises:
        CheckpointError: ``model_index.json`` is unreadable, names no UNet, or the UNet folder
            has no ``config.json`` or no weights.
    """
    directory = Path(directory)
    index = directory / PIPELINE_INDEX
    components = read_json_object(index)
    entry = components.get("unet")
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
        named = sorted(key for key, value in components.items() if not key.startswith("_") and isinstance(value, list))
        raise CheckpointError(
            f"pipeline {str(directory)!r} has no UNet: {PIPELINE_INDEX} names the components {named}; "
            "autoperm aligns the UNet of Stable Diffusion pipelines"
        )
    unet = directory / "unet"
    if not (unet / "config.json").is_file():
        raise CheckpointError(
            f"pipeline {str(directory)!r} has no UNet: {PIPELINE_INDEX} names 'unet' ({entry[0]}.{entry[1]}) "
            f"but {str(unet / 'config.json')!r} does not exist; the download or copy is incomplete"
        )
    find_layout(unet)  # raises when the weights are missing or shards are incomplete
    return unet


def save_pipeline(
    unet_state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    transform: Transform | None = None,
) -> list[str]:
    """Write a pipeline folder: ``source``'s UNet rewritten, every other component copied unchanged.

    The UNet is written in the layout of ``source``'s (same shards, names and dtypes; see
    :func:`autoperm.io.directories.save_directory`), ``transform(name, tensor)`` applied to each
    tensor as its shard is written. The whole folder is built under a temporary name and renamed
    once complete.

    Args:
        unet_state_dict: the UNet's tensors (diffusers names, as stored in ``source/unet``).
        source: the pipeline folder the output derives from.
        output: the folder to create; it must not exist and must not lie inside an input.
        inputs: paths the output must not replace or lie inside.
        transform: optional ``(name, tensor) -> tensor`` applied to the UNet's tensors.

    Returns:
        The names of the entries copied unchanged (``vae``, ``text_encoder``, ``model_index.json``, ...).

    Raises:
        CheckpointError: ``output`` exists or is (inside) an input, or writing fails; nothing
            is left behind.
    """
    source, output = Path(source), Path(output)
    inputs = [Path(path) for path in inputs]
    resolved = output.resolve()
    for path in [source, *inputs]:
        if path.resolve() == resolved or path.resolve() in resolved.parents:
            raise CheckpointError(f"refusing to write {str(output)!r}: it is (inside) the input {str(path)!r}")
    if output.exists():
        raise CheckpointError(f"output {str(output)!r} already exists; remove it or choose another path")
    unet = pipeline_unet(source)
    copied: list[str] = []
    try:
        with atomic_directory(output) as temporary:
            for child in sorted(source.iterdir()):
                if child.name == unet.name or child.name.startswith("."):
                    continue
                if child.is_dir():
                    shutil.copytree(child, temporary / child.name)
                else:
                    shutil.copy2(child, temporary / child.name)
                copied.append(child.name)
            save_directory(unet_state_dict, find_layout(unet), temporary / unet.name, transform=transform)
    except OSError as error:
        raise CheckpointError(f"cannot write {str(output)!r}: {error}") from error
    logger.info("wrote pipeline %s: unet rewritten, %s copied unchanged", output, ", ".join(copied))
    return copied
