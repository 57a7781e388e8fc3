"""Whether two model directories hold the same model: their ``config.json`` compared.

Two checkpoints can have tensors of the same names and shapes and still compute different
functions (another activation, another norm epsilon, another rotary base), so the configs of the
checkpoints ``match`` and ``merge`` read are compared field by field, and a difference is an
error unless the user says it is intended.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from autoperm.errors import ModelLoadError
from autoperm.io import read_json_object
from autoperm.pretrained.directory import ModelDirectory, read_model_directory

__all__ = ["BOOKKEEPING_FIELDS", "config_differences", "check_same_model", "check_config_file"]

BOOKKEEPING_FIELDS = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "_diffusers_version", "dtype", "torch_dtype",
})
"""Config fields that say where and how a checkpoint was saved, not what the model computes
(the stored dtype is kept per tensor when writing)."""


def config_differences(reference: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields whose values differ between two configs, bookkeeping fields left out.

    Args:
        reference: a parsed ``config.json``.
        other: another one.

    Returns:
        ``{field: (reference value, other value)}``; nested configs (``text_config``, ...) give
        dotted names such as ``text_config.hidden_size``; a missing field has the value ``None``.
    """
    return dict(_differences(reference, other, ""))


def _differences(reference: Mapping[str, Any], other: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, tuple[Any, Any]]]:
    for key in sorted(set(reference) | set(other)):
        if not prefix and key in BOOKKEEPING_FIELDS:
            continue
        left, right = reference.get(key), other.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            yield from _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            yield f"{prefix}{key}", (left, right)


def check_same_model(reference: ModelDirectory, other_path: str | Path, allow_config_mismatch: bool = False) -> dict[str, tuple[Any, Any]]:
    """Check that the checkpoint directory ``other_path`` holds the model ``reference`` describes.

    Args:
        reference: the directory that defines the model (MODEL).
        other_path: a checkpoint directory to be aligned or merged with it.
        allow_config_mismatch: accept configs that differ in fields other than the class.

    Returns:
        The differing fields (empty when the configs agree), as :func:`config_differences`.

    Raises:
        ModelLoadError: ``other_path`` has no readable ``config.json``, names another class
            (another architecture), or its config differs and ``allow_config_mismatch`` is not set;
            the message names the fields and both values.
    """
    other_path = Path(other_path)
    if not (other_path / "config.json").is_file():
        raise ModelLoadError(
            f"checkpoint directory {str(other_path)!r} has no config.json, so it cannot be checked against "
            f"{str(reference.path / 'config.json')!r} and an output in its layout would have none; "
            "copy the config it was saved with into it"
        )
    other = read_model_directory(other_path)
    if other.name != reference.name:
        raise ModelLoadError(
            f"{str(other_path)!r} is a {other.name} and {str(reference.path)!r} a {reference.name}: "
            "checkpoints of different architectures cannot be aligned or merged"
        )
    differences = config_differences(reference.config, other.config)
    if differences and not allow_config_mismatch:
        listed = "; ".join(f"{key}: {_short(a)} vs {_short(b)}" for key, (a, b) in list(differences.items())[:6])
        more = f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""
        raise ModelLoadError(
            f"the config.json of {str(other_path)!r} differs from that of {str(reference.path)!r} (which defines the "
            f"model) in {len(differences)} field(s): {listed}{more}; with the same tensors the two may compute different "
            "functions. Give --allow-config-mismatch to go on anyway"
        )
    return differences


def check_config_file(directory: str | Path) -> None:
    """Raise unless ``directory/config.json``, when present, is a readable JSON object.

    Raises:
        ModelLoadError: the file cannot be read or is not a JSON object.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        return
    read_json_object(path, ModelLoadError)


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
