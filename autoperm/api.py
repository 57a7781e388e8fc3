"""Spec consumers that read activations, called with a model.

Activation matching and REPAIR read the outputs of nodes the spec names; in
:mod:`autoperm.solvers` and :mod:`autoperm.evaluate` they take an
:class:`~autoperm.spec.runner.ActivationRunner` and never look at a graph. The functions here are
the ones ``autoperm`` exports: they take the model itself and hand the consumers its
:class:`~autoperm.trace.GraphRunner` (the graph traced as the spec was, node names and all), the
way the CLI wires the steps together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from autoperm.data import Data
from autoperm.evaluate.repair import RepairResult
from autoperm.evaluate.repair import Repairer as SiteRepairer
from autoperm.solvers.activation_matching import activation_matching as match_activations
from autoperm.solvers.result import MatchingResult
from autoperm.spec import PermutationSpec
from autoperm.trace import GraphRunner

__all__ = ["Repairer", "activation_matching", "repair"]

StateDict = Mapping[str, torch.Tensor]


def activation_matching(spec: PermutationSpec, model: nn.Module, state_dict_a: StateDict, state_dict_b: StateDict,
                        data: Any, **options: Any) -> MatchingResult:
    """Activation matching of ``model``'s two state dicts (Git Re-Basin, arXiv 2209.04836, Section 3.1).

    Args:
        spec: the permutation spec of ``model``.
        model: the module the spec was inferred from (its own weights are not used, nor modified).
        state_dict_a, state_dict_b: the two models' state dicts.
        data: ``(inputs, targets)`` batches or an ``(inputs, targets)`` pair; targets are ignored.
        **options: ``batch_size``, ``max_batches``, ``max_iter``, ``seed``, ``device``, ``lap`` of
            :func:`autoperm.solvers.activation_matching`.

    Returns:
        A :class:`MatchingResult`; see :func:`autoperm.solvers.activation_matching`.

    Example:
        >>> result = autoperm.activation_matching(spec, model, sd_a, sd_b, (x_train, y_train))
    """
    return match_activations(spec, GraphRunner.for_spec(spec, model), state_dict_a, state_dict_b, data, **options)


class Repairer(SiteRepairer):
    """:class:`autoperm.evaluate.Repairer` for a model: REPAIR (Jordan et al., arXiv 2211.08403).

    Args:
        spec: the permutation spec of ``model`` (made by :func:`autoperm.infer_spec`).
        model: a module of the architecture (its own weights are not used, nor modified).
        state_dict_a: model A.
        state_dict_b: model B, already aligned to A.
        data: training data, ``(inputs, targets)`` batches or an ``(inputs, targets)`` pair.
        **options: ``batch_size``, ``max_batches``, ``eps``, ``sites``, ``device`` of
            :class:`autoperm.evaluate.Repairer`.

    Example:
        >>> repairer = autoperm.Repairer(spec, model, sd_a, sd_b_aligned, (x_train, y_train))
        >>> curve = autoperm.interpolation_curve(model, sd_a, sd_b_aligned, splits, transform=repairer)
    """

    def __init__(self, spec: PermutationSpec, model: nn.Module, state_dict_a: StateDict, state_dict_b: StateDict,
                 data: Data, **options: Any) -> None:
        runner = GraphRunner.for_spec(spec, model, device=options.get("device"))
        super().__init__(spec, runner, state_dict_a, state_dict_b, data, **options)


def repair(spec: PermutationSpec, model: nn.Module, state_dict_a: StateDict, state_dict_b: StateDict, data: Data,
           t: float = 0.5, **options: Any) -> RepairResult:
    """REPAIR the interpolation of two aligned models at ``t`` (Jordan et al., arXiv 2211.08403).

    Args:
        spec: the permutation spec of ``model``.
        model: a module of the architecture (not modified).
        state_dict_a: model A.
        state_dict_b: model B aligned to A.
        data: training data; see :class:`Repairer`.
        t: the interpolation coefficient (0.5: the midpoint).
        **options: ``batch_size``, ``max_batches``, ``eps``, ``sites``, ``device`` of :class:`Repairer`.

    Returns:
        A :class:`autoperm.RepairResult`; ``.state_dict`` is a plain state dict of the same architecture.

    Raises:
        SpecError: the state dicts do not fit the spec, or the spec records no affine sites.
        DataError: no batches in ``data``.

    Example:
        >>> res = autoperm.repair(spec, model, sd_a, autoperm.apply_permutation(spec, wm.perms, sd_b), (x, y))
        >>> model.load_state_dict(res.state_dict)
    """
    return Repairer(spec, model, state_dict_a, state_dict_b, data, **options).repair(t)
