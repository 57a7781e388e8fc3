"""`autoperm match A B` on Stable Diffusion as its community keeps it.

A and B are LDM single files (``.safetensors`` / ``.ckpt``, SD 1.x, SD 2.x or SDXL) or diffusers
pipeline folders (``model_index.json``). Only the UNet is aligned; the VAE and the text encoders
share no permutation with it and are copied unchanged. The output has B's layout: a single file
with B's names, order, dtypes and metadata, or a pipeline folder with B's components.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoperm.cli.common import load_spec_or_infer
from autoperm.errors import CheckpointError
from autoperm.io import load_state_dict
from autoperm.io.stable_diffusion import (
    component_counts,
    is_pipeline_directory,
    is_single_file,
    pipeline_unet,
    StableDiffusionFile,
    read_stable_diffusion_file,
    save_pipeline,
)
from autoperm.io.single_file import save_single_file
from autoperm.pretrained import build_from_directory, check_names, default_inputs, read_model_directory
from autoperm.pretrained.stable_diffusion import read_ldm_unet
from autoperm.solvers import check_state_dicts
from autoperm.spec import PermutationSpec
from autoperm.spec.apply import permute_tensor

__all__ = ["StableDiffusionPair", "is_stable_diffusion_input", "read_stable_diffusion_pair", "refuse_stable_diffusion_merge"]


@dataclass(frozen=True)
class StableDiffusionPair:
    """Two Stable Diffusion checkpoints read and checked, ready for weight matching.

    Attributes:
        spec: the UNet's permutation spec (inferred, or read from ``--spec``).
        state_dict_a: A's UNet tensors under diffusers names (memory-mapped).
        state_dict_b: B's UNet tensors under diffusers names (memory-mapped).
        description: what the UNet is, for messages (``"SD 1.x UNet"``, ``"diffusers:UNet2DConditionModel"``).
        file_b: B as an LDM single file, or ``None`` for pipeline folders.
        names: ``{stored name: diffusers name}`` of the single files' UNet tensors.
        pipeline_b: B's pipeline folder, or ``None`` for single files.
    """

    spec: PermutationSpec
    state_dict_a: dict[str, torch.Tensor]
    state_dict_b: dict[str, torch.Tensor]
    description: str
    file_b: StableDiffusionFile | None = None
    names: dict[str, str] | None = None
    pipeline_b: str | None = None

    def write(self, perms: Mapping[str, torch.Tensor], output: str, inputs: list[str]) -> str:
        """Write B with its UNet permuted by ``perms``, in B's layout; returns what was done, in one line.

        Raises:
            CheckpointError: the output exists or lies inside an input, or writing fails.
        """
        members = self.spec.members_by_param

        def permute(stored: str, tensor: torch.Tensor) -> torch.Tensor:
            name = stored if self.names is None else self.names.get(stored)  # None: not a UNet tensor
            return permute_tensor(self.spec, perms, name, tensor) if name in members else tensor

        if self.file_b is not None:
            save_single_file(self.file_b.tensors, self.file_b.layout, output, inputs=inputs, transform=permute)
            counts = component_counts(self.file_b.layout.keys)
            others = ", ".join(f"{label} ({count} tensors)" for label, count in counts.items() if label != "UNet")
            return f"{self.description} aligned ({counts['UNet']} tensors); copied unchanged: {others or 'nothing else'}"
        copied = save_pipeline(self.state_dict_b, self.pipeline_b, output, inputs=inputs, transform=permute)
        return (
            f"unet aligned; copied unchanged: {', '.join(copied)} "
            "(the VAE and text encoders share no permutation with the UNet)"
        )


def is_stable_diffusion_input(path: str) -> bool:
    """Whether ``path`` is read as Stable Diffusion: a single weights file or a pipeline folder."""
    return is_single_file(path) or is_pipeline_directory(path)


def refuse_stable_diffusion_merge(path: str) -> None:
    """Refuse a pipeline folder or an LDM single file as the first checkpoint of `merge`.

    Raises:
        CheckpointError: ``path`` is Stable Diffusion; the message says what to do instead.
    """
    if is_pipeline_directory(path):
        kind = "a diffusers pipeline"
    elif is_single_file(path):
        try:
            read_stable_diffusion_file(path)
        except CheckpointError:
            return
        kind = "a Stable Diffusion single file"
    else:
        return
    raise CheckpointError(
        f"merge does not take Stable Diffusion checkpoints ({path!r} is {kind}): align each one to the first with "
        "`autoperm match A B -o B-aligned`, then merge the aligned files with the method of your choice (sd-mecha)"
    )


def read_stable_diffusion_pair(path_a: str, path_b: str, output: str, spec_path: str | None) -> StableDiffusionPair:
    """Read two LDM single files or two pipeline folders, check them, and get the UNet's spec.

    Args:
        path_a: the reference: an LDM single file (SD 1.x, SD 2.x or SDXL) or a pipeline folder.
        path_b: the checkpoint to align, of the same kind and architecture as A.
        output: where B aligned will be written (checked here, before any work).
        spec_path: a spec YAML for the UNet (diffusers names), or ``None`` to infer it.

    Returns:
        The pair, ready for :func:`autoperm.solvers.weight_matching` and :meth:`StableDiffusionPair.write`.

    Raises:
        CheckpointError: an unknown layout, a pipeline without a UNet, unreadable or truncated
            weights, A and B of different architectures or kinds, an output that exists or does
            not end like B.
    """
    if Path(output).exists():
        raise CheckpointError(f"output {output!r} already exists; remove it or choose another path")
    if is_pipeline_directory(path_a) != is_pipeline_directory(path_b):
        kinds = ["a pipeline folder" if is_pipeline_directory(p) else "not a pipeline folder" for p in (path_a, path_b)]
        raise CheckpointError(f"A {path_a!r} is {kinds[0]} but B {path_b!r} is {kinds[1]}; give two of the same kind")
    if is_pipeline_directory(path_a):
        return _read_pipelines(path_a, path_b, spec_path)
    return _read_single_files(path_a, path_b, output, spec_path)


def _read_single_files(path_a: str, path_b: str, output: str, spec_path: str | None) -> StableDiffusionPair:
    file_a, file_b = read_stable_diffusion_file(path_a), read_stable_diffusion_file(path_b)
    if Path(output).suffix != file_b.path.suffix:
        raise CheckpointError(
            f"output {output!r} must end in {file_b.path.suffix} like B {path_b!r}: it is written in B's layout and format"
        )
    unet = read_ldm_unet(file_a.tensors, path_a)
    unet_b = read_ldm_unet(file_b.tensors, path_b)
    _same_architecture(unet.family, unet_b.family, file_a.unet, file_b.unet, path_a, path_b)
    model = unet.build("meta")
    description = f"{unet.family} UNet"
    sd_a, sd_b = unet.rename(file_a.unet), unet.rename(file_b.unet)
    example = default_inputs(model, unet.directory, device="meta")
    spec = _spec(model, example, description, spec_path, sd_a, sd_b, [path_a, path_b])
    return StableDiffusionPair(spec, sd_a, sd_b, description, file_b=file_b, names=unet.names)


def _same_architecture(
    family_a: str, family_b: str, unet_a: Mapping[str, torch.Tensor], unet_b: Mapping[str, torch.Tensor],
    path_a: str, path_b: str,
) -> None:
    """Raise unless the two UNets have the same tensor names and shapes."""
    if family_a != family_b:
        raise CheckpointError(
            f"A {path_a!r} holds an {family_a} UNet but B {path_b!r} an {family_b} UNet: two files of different "
            "architectures; align two of one architecture"
        )
    only_a = [name for name in unet_a if name not in unet_b]
    only_b = [name for name in unet_b if name not in unet_a]
    if only_a or only_b:
        raise CheckpointError(
            f"A {path_a!r} and B {path_b!r} are {family_a} UNets of different architectures: only A has {only_a[:2]} "
            f"({len(only_a)} in all), only B has {only_b[:2]} ({len(only_b)} in all)"
        )
    for name, tensor in unet_a.items():
        if tuple(tensor.shape) != tuple(unet_b[name].shape):
            raise CheckpointError(
                f"A {path_a!r} and B {path_b!r} are {family_a} UNets of different sizes: {name!r} has shape "
                f"{list(tensor.shape)} in A and {list(unet_b[name].shape)} in B"
            )


def _read_pipelines(path_a: str, path_b: str, spec_path: str | None) -> StableDiffusionPair:
    unet_a, unet_b = pipeline_unet(path_a), pipeline_unet(path_b)
    directory = read_model_directory(unet_a)
    model = build_from_directory(directory, "meta")
    sd_a, sd_b = load_state_dict(unet_a), load_state_dict(unet_b)
    for path, state_dict in ((unet_a, sd_a), (unet_b, sd_b)):
        check_names(state_dict, model, str(path), directory.name)
    example = default_inputs(model, directory, device="meta")
    spec = _spec(model, example, directory.name, spec_path, sd_a, sd_b, [str(unet_a), str(unet_b)])
    return StableDiffusionPair(spec, sd_a, sd_b, directory.name, pipeline_b=path_b)


def _spec(
    model: nn.Module, example: Any, name: str, spec_path: str | None, sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor], paths: list[str],
) -> PermutationSpec:
    """The spec from ``--spec`` or inferred, checked against the model and both checkpoints."""
    spec = load_spec_or_infer(spec_path, model, example, name)
    check_state_dicts(spec, [model.state_dict(), sd_a, sd_b], names=[name, *paths])
    return spec
