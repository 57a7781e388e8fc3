"""Tensor names as a directory stores them, and as the model class names them.

transformers 5 keeps some checkpoints under other names than its classes use and converts them
when loading (``from_pretrained``) and back when saving (``save_pretrained``): GPT-NeoX's
``embed_out`` is the class's ``lm_head``, ViT's ``encoder.layer.N.attention.attention.query``
is ``layers.N.attention.q_proj``, and fused mixture-of-experts weights are stacked from one
stored tensor per expert. The conversions are transformers' own, read from its conversion
mapping (``transformers.conversion_mapping``); autoperm keeps no table of its own.

A conversion that only renames a tensor is supported: the weights are read under the class's
names (which the spec uses) and written back under the stored ones. A conversion that merges,
splits or reshapes tensors (``WeightConverter`` in transformers) is not: it is refused with a
message naming the stored tensors and the operations.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from autoperm.errors import CheckpointError
from autoperm.io import find_layout, load_state_dict

__all__ = ["StoredNames", "stored_names", "load_directory_weights"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredNames:
    """How the tensor names stored in a checkpoint directory map to the model's state-dict names.

    Attributes:
        directory: the checkpoint directory.
        to_model: ``{stored name: model name}`` for every stored tensor (the identity where
            nothing is renamed).
    """

    directory: Path
    to_model: dict[str, str] = field(repr=False)

    @property
    def to_stored(self) -> dict[str, str]:
        """``{model name: stored name}``, the inverse of :attr:`to_model`."""
        return {model: stored for stored, model in self.to_model.items()}

    @property
    def renamed(self) -> dict[str, str]:
        """The stored names that differ from the model's, ``{stored: model}``."""
        return {stored: model for stored, model in self.to_model.items() if stored != model}

    def model_state_dict(self, stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``stored`` (keyed by stored names) keyed by the model's names; tensors are not copied."""
        return {self.to_model.get(name, name): tensor for name, tensor in stored.items()}

    def stored_state_dict(self, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``model`` (keyed by model names) keyed by the stored names; tensors are not copied."""
        to_stored = self.to_stored
        return {to_stored.get(name, name): tensor for name, tensor in model.items()}


def stored_names(directory: str | os.PathLike[str], model: nn.Module, keys: Sequence[str] | None = None) -> StoredNames:
    """The model names of the tensors stored in ``directory``, by transformers' conversion mapping.

    Args:
        directory: a ``save_pretrained`` directory.
        model: the model the weights are for (on any device, the meta device included); a model
            that is not a transformers ``PreTrainedModel`` keeps its names.
        keys: the stored names (default: those of the directory's layout, read from the headers).

    Returns:
        A :class:`StoredNames`; the identity when transformers renames nothing.

    Raises:
        CheckpointError: a stored tensor is merged, split or reshaped when loading (not a
            renaming), or two stored names map to one model name.
    """
    directory = Path(directory)
    keys = list(find_layout(directory).keys if keys is None else keys)
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return StoredNames(directory, {key: key for key in keys})
    from transformers.core_model_loading import rename_source_key

    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    to_model: dict[str, str] = {}
    converted: dict[str, list[str]] = {}
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:  # as from_pretrained: keep a name the model has
            renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        if pattern is not None:
            converted.setdefault(renamed, []).append(key)
        to_model[key] = renamed
    if converted:
        raise _not_a_renaming(directory, converted, converters)
    by_model: dict[str, str] = {}
    for stored, renamed in to_model.items():
        if renamed in by_model:
            raise CheckpointError(
                f"checkpoint directory {str(directory)!r}: the stored tensors {by_model[renamed]!r} and {stored!r} both "
                f"become {renamed!r} under transformers' conversion mapping; the directory holds the same tensor twice"
            )
        by_model[renamed] = stored
    names = StoredNames(directory, to_model)
    if names.renamed:
        logger.info("%s: %d stored tensor name(s) renamed as transformers loads them", directory, len(names.renamed))
    return names


def load_directory_weights(
    directory: str | os.PathLike[str], model: nn.Module, tied: Iterable[Iterable[str]] = ()
) -> tuple[dict[str, torch.Tensor], StoredNames]:
    """Read a directory's weights (memory-mapped) under the model's names.

    Args:
        directory: a ``save_pretrained`` directory.
        model: the model the weights are for (any device).
        tied: groups of model names sharing one tensor; a name missing from the files is filled
            in with its tied partner (``save_pretrained`` stores a tied tensor once).

    Returns:
        ``(state_dict, names)``: the tensors keyed by model names, and the :class:`StoredNames`
        to write them back under the stored names.

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


def _not_a_renaming(directory: Path, converted: Mapping[str, list[str]], converters: Sequence) -> CheckpointError:
    target, sources = next(iter(converted.items()))
    operations = sorted({type(op).__name__ for converter in converters for op in getattr(converter, "operations", [])})
    count = sum(len(stored) for stored in converted.values())
    return CheckpointError(
        f"checkpoint directory {str(directory)!r}: transformers converts {count} stored tensor(s) into "
        f"{len(converted)} model tensor(s) when loading, e.g. {sources[:3]} into {target!r} (operations: "
        f"{', '.join(operations) or 'unnamed'}). autoperm follows stored names that are only renamed; tensors that are "
        "merged, split or reshaped (fused mixture-of-experts weights) are not supported yet by match and merge "
        "(spec and verify work on the directory)"
    )
