"""Eval mode for tracing and running a model, with every flag restored afterwards."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["EvalMode"]


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
