"""Helpers the front-ends and the runner share: eval mode, state-dict aliasing, input binding, values to refs."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten

from autoperm.trace.graph import TensorRef

__all__ = ["EvalMode", "state_aliases", "bind_inputs", "refs_for_value", "normalise_inputs", "InputSpec", "first_lines", "convert_arguments"]

InputSpec = tuple[tuple[Any, ...], dict[str, Any]]


class EvalMode:
    """Put a model in eval mode with caching off for tracing; restore everything afterwards.

    Models with a key/value cache (every causal LM of ``transformers``, whose configs default to
    ``use_cache=True``) return cache objects that neither front-end can trace and that are no
    function of the weights worth comparing; their ``config.use_cache`` (and that of nested
    configs, e.g. ``text_config``) is switched off while tracing, so default configs trace.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []
        self.caches: list[Any] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.caches = _cache_switches(self.model)
        for config in self.caches:
            config.use_cache = False
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for module, flag in self.flags:
            module.training = flag
        for config in self.caches:
            config.use_cache = True


def _cache_switches(model: nn.Module) -> list[Any]:
    """The configs reachable from ``model``'s modules whose ``use_cache`` is on (each once)."""
    found: dict[int, Any] = {}
    pending = [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or isinstance(config, (str, int, float, bool, torch.Tensor)):
            continue
        if getattr(config, "use_cache", None) is True:
            found[id(config)] = config
        else:
            found.setdefault(id(config), None)
        for name in ("text_config", "decoder", "encoder", "language_config", "llm_config"):
            pending.append(getattr(config, name, None))
    return [config for config in found.values() if config is not None]


def normalise_inputs(example_inputs: Any) -> InputSpec:
    """Accept a tensor, a tuple/list of positional args, or a dict of keyword args."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def state_aliases(model: nn.Module) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Map every state-dict name to a canonical name (tied weights share one tensor).

    Returns:
        ``(alias -> canonical name, canonical name -> tensor)``; the canonical name of a tensor
        is the first state-dict name under which it appears.
    """
    canonical_of: dict[int, str] = {}
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key not in canonical_of:
            canonical_of[key] = name
            tensors[name] = tensor
        aliases[name] = canonical_of[key]
    # names reachable as attributes but dropped from the state dict by remove_duplicate
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if name not in aliases and id(tensor) in canonical_of:
            aliases[name] = canonical_of[id(tensor)]
    return aliases, tensors


def bind_inputs(forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """Bind example inputs to ``forward``'s signature (raises TypeError on a mismatch)."""
    signature = inspect.signature(forward)
    return signature.bind(*args, **kwargs)


def refs_for_value(node_name: str, value: Any, floating_default: bool = True) -> list[TensorRef | None]:
    """Refs for a node's value: one for a tensor, one per leaf for a tuple/list/dict of tensors."""
    if isinstance(value, torch.Tensor):
        return [TensorRef(node_name, tuple(int(s) for s in value.shape), floating=value.is_floating_point())]
    if isinstance(value, (tuple, list, dict)):
        leaves, _ = tree_flatten(value)
        refs: list[TensorRef | None] = []
        for index, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                refs.append(TensorRef(f"{node_name}[{index}]", tuple(int(s) for s in leaf.shape), floating=leaf.is_floating_point()))
            else:
                refs.append(None)
        return refs
    return []


def first_lines(error: BaseException, count: int = 4) -> str:
    """The start of an error message (torch.export appends whole graphs to its messages)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = " ".join(lines[:count])
    return text if len(lines) <= count else text + " ..."


def convert_arguments(value: Any, converted: Mapping[str, Any]) -> Any:
    """Replace graph nodes in a (nested) argument by their converted values (refs, plain values)."""
    if isinstance(value, torch.fx.Node):
        return converted.get(value.name)
    if isinstance(value, (list, tuple)):
        items = [convert_arguments(v, converted) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: convert_arguments(v, converted) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(convert_arguments(v, converted) for v in (value.start, value.stop, value.step)))
    return value
