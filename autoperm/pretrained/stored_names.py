"""Tensor names as a directory stores them, and as the model class names them.

transformers 5 keeps some checkpoints under other names than its classes use and converts them
when loading (``from_pretrained``) and back when saving (``save_pretrained``): GPT-NeoX's
``embed_out`` is the class's ``lm_head``, ViT's ``encoder.layer.N.attention.attention.query``
is ``layers.N.attention.q_proj``, and mixture-of-experts weights are stored one tensor per
expert (Mixtral's ``experts.E.w1.weight``, ``w2``, ``w3``; Qwen2-MoE's ``gate_proj``,
``up_proj``, ``down_proj``) and stacked into the class's ``experts.gate_up_proj`` and
``experts.down_proj``. The conversions are transformers' own, read from its conversion mapping
(``transformers.conversion_mapping``) and run by its operations
(``transformers.core_model_loading``); autoperm keeps no table of its own.

Two kinds of conversion are supported: renaming, and stacking and concatenating several stored
tensors into one model tensor (the operations ``MergeModulelist`` and ``Concatenate``, exact
rearrangements of the numbers whose reverse, ``SplitModulelist`` and ``Chunk``, transformers
uses when saving). Weights are read under the class's names (which the spec uses): one model
tensor is converted at a time from its stored tensors, which stay memory-mapped. They are
written back under the stored names by transformers' reverse conversion
(``revert_weight_conversion``, what ``save_pretrained`` runs), one model tensor at a time. Any
other operation (splitting a fused ``qkv`` with ``Chunk``, transposing, RoPE permutations,
dequantising) is refused with one message naming the stored tensors and the operations.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoperm.errors import CheckpointError
from autoperm.io import find_layout, load_state_dict, save_directory
from autoperm.io.directories import Transform

__all__ = [
    "Conversion",
    "StoredNames",
    "SUPPORTED_OPERATIONS",
    "load_directory_weights",
    "save_directory_weights",
    "stored_names",
]

logger = logging.getLogger(__name__)

SUPPORTED_OPERATIONS = ("MergeModulelist", "Concatenate")
"""transformers' conversion operations autoperm runs (classes of ``transformers.core_model_loading``)."""


@dataclass(frozen=True)
class Conversion:
    """Stored tensors that transformers converts into one model tensor when loading, and back when saving.

    Example: Mixtral's ``model.layers.0.block_sparse_moe.experts.E.w1.weight`` and ``...w3.weight``
    (E = 0, 1, ...) are stacked along a new leading axis and concatenated along the next into
    ``model.layers.0.mlp.experts.gate_up_proj``.

    Attributes:
        model: the model's tensor name.
        stored: the stored tensor names, in the order transformers collects them (by name, with
            numbers in numeric order).
        patterns: the converter's source pattern each stored name matched, in ``stored``'s order.
        operations: the names of transformers' operations run when loading, in order.
        converter: transformers' ``WeightConverter`` that loads them (a template, never run itself).
        module: the model the conversion mapping is for (transformers' reverse conversion reads it).
    """

    model: str
    stored: tuple[str, ...]
    patterns: tuple[str, ...]
    operations: tuple[str, ...]
    converter: Any = field(repr=False, compare=False)
    module: nn.Module = field(repr=False, compare=False)

    def to_model(self, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model tensor, from the stored tensors by transformers' operations.

        Args:
            stored: tensors keyed by stored names, holding at least :attr:`stored` (left unchanged;
                memory-mapped ones are read by the operations, not copied beforehand).

        Returns:
            A new tensor, in the stored tensors' dtype.

        Raises:
            CheckpointError: a stored tensor is missing, the operations fail (tensors of
                different shapes), or transformers' reverse conversion would not give back the
                stored shapes (then the output could not be written as stored), naming the tensors.
        """
        missing = [name for name in self.stored if name not in stored]
        if missing:
            raise CheckpointError(f"{self.model!r} is converted from {len(self.stored)} stored tensors, but {missing[:3]} are missing")
        converter = copy.deepcopy(self.converter)  # it collects the tensors: a fresh one per model tensor, as transformers does
        for name, pattern in zip(self.stored, self.patterns, strict=True):
            converter.add_tensor(self.model, name, pattern, stored[name])
        try:
            converted = converter.convert(self.model, model=self.module, config=getattr(self.module, "config", None))
        except Exception as error:  # transformers' operations raise torch's errors on tensors that do not fit
            shapes = sorted({tuple(stored[name].shape) for name in self.stored})
            raise CheckpointError(
                f"transformers' {', '.join(self.operations)} cannot convert {list(self.stored[:3])} (shapes {shapes[:3]}) "
                f"into {self.model!r}: {type(error).__name__}: {error}"
            ) from error
        if set(converted) != {self.model}:
            raise CheckpointError(f"transformers converted {list(self.stored[:3])} into {sorted(converted)[:3]}, expected {self.model!r}")
        tensor = converted[self.model]
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        back = self.to_stored(torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))  # shapes only, no data
        wrong = [name for name in self.stored if tuple(back[name].shape) != tuple(stored[name].shape)]
        if wrong:
            raise CheckpointError(
                f"transformers' reverse conversion of {self.model!r} gives {len(wrong)} stored tensor(s) other shapes than "
                f"they have, e.g. {wrong[0]!r}: {list(back[wrong[0]].shape)} for {list(stored[wrong[0]].shape)}; "
                "autoperm could not write it back as stored"
            )
        return tensor

    def to_stored(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of ``tensor`` (the model tensor), by transformers' reverse conversion.

        This is what ``save_pretrained`` writes (``revert_weight_conversion``); works on the
        ``meta`` device too (names and shapes only).

        Args:
            tensor: the model tensor (left unchanged).

        Returns:
            ``{stored name: tensor}``; the tensors may be views of one another.

        Raises:
            CheckpointError: transformers writes other names than :attr:`stored`.
        """
        from transformers.core_model_loading import revert_weight_conversion

        pieces = revert_weight_conversion(self.module, {self.model: tensor})
        if set(pieces) != set(self.stored):
            unexpected = sorted(set(pieces) - set(self.stored))
            absent = [name for name in self.stored if name not in pieces]
            raise CheckpointError(
                f"transformers' reverse conversion writes {self.model!r} of shape {list(tensor.shape)} as {len(pieces)} "
                f"stored tensor(s), {len(self.stored)} were read: not read {unexpected[:3]}, not written {absent[:3]}. "
                "The directory does not hold this model's configuration (number of experts?), or transformers "
                "does not save what it loads"
            )
        return pieces


@dataclass(frozen=True)
class StoredNames:
    """How the tensors stored in a checkpoint directory map to the model's state-dict tensors.

    Attributes:
        directory: the checkpoint directory.
        to_model: ``{stored name: model name}`` for every stored tensor that is kept or renamed
            (the identity where nothing is renamed).
        conversions: the stored tensors converted into other model tensors (mixture-of-experts
            weights stacked), one :class:`Conversion` per model tensor.
    """

    directory: Path
    to_model: dict[str, str] = field(repr=False)
    conversions: tuple[Conversion, ...] = field(default=(), repr=False)

    @property
    def to_stored(self) -> dict[str, str]:
        """``{model name: stored name}``, the inverse of :attr:`to_model` (converted tensors left out)."""
        return {model: stored for stored, model in self.to_model.items()}

    @property
    def renamed(self) -> dict[str, str]:
        """The stored names that differ from the model's, ``{stored: model}`` (converted tensors left out)."""
        return {stored: model for stored, model in self.to_model.items() if stored != model}

    def model_state_dict(self, stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``stored`` (keyed by stored names) keyed by the model's names.

        Kept and renamed tensors are not copied; each converted model tensor is built from its
        stored tensors, one at a time (it holds new memory, the stored tensors stay mapped).

        Raises:
            CheckpointError: a conversion fails (see :meth:`Conversion.to_model`), naming the directory.
        """
        converted = {name for conversion in self.conversions for name in conversion.stored}
        state_dict = {self.to_model.get(name, name): tensor for name, tensor in stored.items() if name not in converted}
        for conversion in self.conversions:
            try:
                state_dict[conversion.model] = conversion.to_model(stored)
            except CheckpointError as error:
                raise CheckpointError(f"checkpoint directory {str(self.directory)!r}: {error}") from error
        return state_dict

    def stored_state_dict(self, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``model`` (keyed by model names) keyed by the stored names.

        Kept and renamed tensors are not copied; converted ones are split back into their stored
        tensors (views of the model tensor). :func:`save_directory_weights` does the same one
        model tensor at a time while writing.

        Raises:
            CheckpointError: see :meth:`Conversion.to_stored`.
        """
        targets = {conversion.model: conversion for conversion in self.conversions}
        to_stored = self.to_stored
        state_dict = {to_stored.get(name, name): tensor for name, tensor in model.items() if name not in targets}
        for name, conversion in targets.items():
            if name in model:
                state_dict.update(conversion.to_stored(model[name]))
        return state_dict


def stored_names(directory: str | os.PathLike[str], model: nn.Module, keys: Sequence[str] | None = None) -> StoredNames:
    """The model names of the tensors stored in ``directory``, by transformers' conversion mapping.

    Args:
        directory: a ``save_pretrained`` directory.
        model: the model the weights are for (on any device, the meta device included); a model
            that is not a transformers ``PreTrainedModel`` keeps its names.
        keys: the stored names (default: those of the directory's layout, read from the headers).

    Returns:
        A :class:`StoredNames`; the identity when transformers converts nothing.

    Raises:
        CheckpointError: stored tensors are converted by other operations than
            :data:`SUPPORTED_OPERATIONS`, transformers' reverse conversion would write other
            names than those stored, or two stored names map to one model name.

    Example:
        >>> names = stored_names("mixtral-b/", model)
        >>> names.conversions[0].model, names.conversions[0].stored[:2]
        ('model.layers.0.mlp.experts.gate_up_proj', ('model.layers.0.block_sparse_moe.experts.0.w1.weight', ...))
    """
    directory = Path(directory)
    keys = list(find_layout(directory).keys if keys is None else keys)
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return StoredNames(directory, {key: key for key in keys})
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    to_model: dict[str, str] = {}
    sources: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(keys, key=dot_natural_key):  # transformers collects a converter's tensors in this order
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:  # as from_pretrained: keep a name the model has
            renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        if pattern is None:
            to_model[key] = renamed
        else:
            sources.setdefault(renamed, []).append((key, pattern))
    conversions = _checked_conversions(directory, model, sources, converters, expected)
    by_model: dict[str, str] = {}
    for stored, renamed in [*to_model.items(), *((c.stored[0], c.model) for c in conversions)]:
        if renamed in by_model:
            raise CheckpointError(
                f"checkpoint directory {str(directory)!r}: the stored tensors {by_model[renamed]!r} and {stored!r} both "
                f"become {renamed!r} under transformers' conversion mapping; the directory holds the same tensor twice"
            )
        by_model[renamed] = stored
    names = StoredNames(directory, {key: to_model[key] for key in keys if key in to_model}, conversions)
    if names.renamed or conversions:
        logger.info("%s: %d stored tensor name(s) renamed and %d model tensor(s) converted from %d stored ones, as "
                    "transformers loads them", directory, len(names.renamed), len(conversions),
                    sum(len(conversion.stored) for conversion in conversions))
    return names


def load_directory_weights(
    directory: str | os.PathLike[str], model: nn.Module, tied: Iterable[Iterable[str]] = ()
) -> tuple[dict[str, torch.Tensor], StoredNames]:
    """Read a directory's weights under the model's names.

    Kept and renamed tensors are memory-mapped; converted ones (mixture-of-experts weights) are
    built one model tensor at a time from their memory-mapped stored tensors, so reading needs
    the memory of the converted tensors and no more.

    Args:
        directory: a ``save_pretrained`` directory.
        model: the model the weights are for (any device).
        tied: groups of model names sharing one tensor; a name missing from the files is filled
            in with its tied partner (``save_pretrained`` stores a tied tensor once).

    Returns:
        ``(state_dict, names)``: the tensors keyed by model names, and the :class:`StoredNames`
        to write them back under the stored names (:func:`save_directory_weights`).

    Raises:
        CheckpointError: see :func:`stored_names` and :func:`autoperm.io.load_state_dict`.
    """
    names = stored_names(directory, model)
    state_dict = names.model_state_dict(load_state_dict(directory))
    for group in tied:
        group = list(group)
        present = [name for name in group if name in state_dict]
        for name in group:
            if present and name not in state_dict:
                state_dict[name] = state_dict[present[0]]
    return state_dict, names


def save_directory_weights(
    state_dict: Mapping[str, torch.Tensor],
    names: StoredNames,
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    transform: Transform | None = None,
) -> None:
    """Write ``state_dict`` (model names) as a directory in the layout of ``names.directory``, under its stored names.

    The output has the stored names, shards, dtypes and other files of ``names.directory``
    (:func:`autoperm.io.save_directory`), so ``from_pretrained`` reads it as it reads the
    input. A converted model tensor is transformed and converted back (transformers' reverse
    conversion) when the first of its stored tensors is written; its stored tensors are kept
    until the last of them is written, so writing needs the memory of the model tensors whose
    stored tensors are being written, not of the model.

    Args:
        state_dict: tensors keyed by the model's names (left unchanged).
        names: the stored names of the directory whose layout the output follows.
        output: the output directory (must not exist).
        inputs: paths the output must not replace or lie inside.
        transform: ``transform(model name, tensor)`` applied to each model tensor before it is
            written (or converted back).

    Raises:
        CheckpointError: a model tensor is missing, a conversion back fails, or see
            :func:`autoperm.io.save_directory`; nothing is written.
    """
    converted = {conversion.model: conversion for conversion in names.conversions}
    missing = [name for name in converted if name not in state_dict]
    if missing:
        raise CheckpointError(f"cannot write {str(output)!r}: the state dict lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    to_stored, to_model = names.to_stored, names.to_model
    stored = {to_stored.get(name, name): tensor for name, tensor in state_dict.items() if name not in converted}
    by_stored: dict[str, Conversion] = {}
    for conversion in names.conversions:  # placeholders of the stored shapes, without data
        tensor = state_dict[conversion.model]
        stored.update(conversion.to_stored(torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")))
        by_stored.update((name, conversion) for name in conversion.stored)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # model name: its stored tensors not written yet

    def produce(name: str, tensor: torch.Tensor) -> torch.Tensor:
        conversion = by_stored.get(name)
        if conversion is None:
            return transform(to_model.get(name, name), tensor) if transform is not None else tensor
        if conversion.model not in pending:
            whole = state_dict[conversion.model]
            pending[conversion.model] = conversion.to_stored(transform(conversion.model, whole) if transform is not None else whole)
        pieces = pending[conversion.model]
        piece = pieces.pop(name)
        if not pieces:
            del pending[conversion.model]
        return piece

    save_directory(stored, find_layout(names.directory), output, inputs=inputs, transform=produce)


def _conversions(model: nn.Module) -> tuple[list, list]:
    """transformers' ``(renamings, converters)`` for ``model``; empty for other models."""
    if "transformers" not in sys.modules:  # then the model is no PreTrainedModel
        return [], []
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers 4 stores tensors under the class's names
        return [], []
    if not isinstance(model, PreTrainedModel):
        return [], []
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    return renamings, converters


def _checked_conversions(
    directory: Path,
    model: nn.Module,
    sources: Mapping[str, list[tuple[str, str]]],
    converters: Sequence[Any],
    expected: Mapping[str, torch.Tensor],
) -> tuple[Conversion, ...]:
    """One :class:`Conversion` per model tensor of ``sources`` (``{model name: [(stored name, pattern)]}``).

    Raises:
        CheckpointError: a converter runs other operations than :data:`SUPPORTED_OPERATIONS` or
            makes several model tensors (all such are named), or transformers' reverse
            conversion of a model tensor of the model's shape writes other names than those stored.
    """
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    conversions, unsupported = [], {}
    for target, items in sources.items():
        converter = by_pattern[items[0][1]]  # as transformers: the converter of the first tensor collected
        operations = tuple(type(operation).__name__ for operation in converter.operations)
        if not _is_supported(converter) or any(pattern not in converter.source_patterns for _, pattern in items):
            unsupported[target] = ([stored for stored, _ in items], operations, len(converter.target_patterns))
            continue
        conversions.append(Conversion(target, tuple(stored for stored, _ in items), tuple(pattern for _, pattern in items),
                                      operations, converter, model))
    if unsupported:
        raise _not_supported(directory, unsupported)
    for conversion in conversions:
        if conversion.model in expected:  # else the model lacks it: named when the names are checked
            shape = expected[conversion.model]
            try:
                conversion.to_stored(torch.empty(shape.shape, dtype=shape.dtype, device="meta"))
            except CheckpointError as error:
                raise CheckpointError(f"checkpoint directory {str(directory)!r}: {error}") from error
    return tuple(conversions)


def _is_supported(converter: Any) -> bool:
    """Whether autoperm runs ``converter``: one model tensor, made by supported operations only."""
    from transformers import core_model_loading

    supported = tuple(getattr(core_model_loading, name) for name in SUPPORTED_OPERATIONS)
    operations = list(converter.operations)
    return (len(converter.target_patterns) == 1 and bool(operations)
            and all(type(operation) in supported for operation in operations)
            and getattr(converter, "quantization_operation", None) is None)


def _not_supported(directory: Path, unsupported: Mapping[str, tuple[list[str], tuple[str, ...], int]]) -> CheckpointError:
    target, (sources, _, targets) = next(iter(unsupported.items()))
    operations = sorted({operation for _, names, _ in unsupported.values() for operation in names})
    stored = [name for names, _, _ in unsupported.values() for name in names]
    more = f" and {targets - 1} other model tensor(s)" if targets > 1 else ""
    return CheckpointError(
        f"checkpoint directory {str(directory)!r}: transformers converts {len(stored)} stored tensor(s) when loading by "
        f"operations autoperm does not run ({', '.join(operations) or 'unnamed'}): {stored[:4]}"
        f"{' ...' if len(stored) > 4 else ''}; e.g. {sources[0]!r} becomes {target!r}{more}. match and merge follow "
        f"stored tensors that are renamed, or stacked and concatenated ({', '.join(SUPPORTED_OPERATIONS)}: "
        "mixture-of-experts weights); tensors split, transposed or otherwise reshaped are not supported (spec and "
        "verify work on the directory)"
    )
