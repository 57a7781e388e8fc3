"""Canonical form: norm gains folded into the layers that read them, so the larger group applies.

A LayerNorm or RMSNorm whose output only linear layers read (a :class:`NormFold` of the spec)
computes ``W (g * n(x) + beta) + b`` at each reader. Its gain and bias are a choice of *gauge*:
with ``W' = W diag(g)`` and ``b' = b + W beta`` the norm's gain becomes 1 and its bias 0 and the
model computes the same function. In that form a LayerNorm keeps every orthogonal map that fixes
the all-ones vector and an RMSNorm every orthogonal map, so the residual stream of a pre-norm
transformer admits orthogonal transforms instead of permutations only.

:func:`canonicalize` moves a state dict into that gauge (the spec it returns states the larger
kinds); :func:`to_gauge` moves a canonical state dict back into the gauge of a reference model
(its gains and norm biases), so interpolating with the reference equals interpolating the two
canonical forms. Both work in float64 and return tensors of the input's dtypes.

Where a reader has no bias, the norm's bias cannot move into the readers; it then stays in the
norm, rescaled (``beta / g``), and moves with the stream (a writer of it), which every kind of
the stream admits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from autoperm.errors import SpecError
from autoperm.spec.schema import NormFold, PermutationGroup, PermutationSpec

__all__ = ["canonicalize", "to_gauge", "canonical_spec"]


def canonicalize(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> tuple[PermutationSpec, dict[str, torch.Tensor]]:
    """Fold every foldable norm gain (and bias) of ``state_dict`` into the layers that read it.

    Each reader's weight is scaled along its input axis by the gain (``W[:, i] *= g[i]``) and
    its bias takes the norm's bias (``b += W_old @ beta``); the gain becomes 1 and the bias 0.
    The result loads into the same model class and computes the same function.

    Args:
        spec: an inferred spec; its ``norm_folds`` say what to fold (none: nothing changes).
        state_dict: the model's state dict; it is not modified.

    Returns:
        ``(canonical spec, canonical state dict)``: the spec from :func:`canonical_spec`, and a
        new dict (tensors no fold touches are the same objects).

    Raises:
        SpecError: the state dict lacks a parameter a fold names, or a norm whose bias stays in
            it (a reader without bias) has a zero gain where the bias is not zero.

    Example:
        >>> spec = autoperm.infer_spec(model, example_inputs)
        >>> canonical, state = autoperm.canonicalize(spec, model.state_dict())
        >>> model.load_state_dict(state)        # same function; the stream group is now orthogonal
    """
    result = dict(state_dict)
    for fold in spec.norm_folds:
        gain = _tensor(state_dict, fold.gain, fold)
        bias = _tensor(state_dict, fold.bias, fold) if fold.bias is not None else None
        _regauge(fold, state_dict, result, torch.ones_like(gain), torch.zeros_like(bias) if bias is not None else None)
    return canonical_spec(spec), result


def to_gauge(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor],
             reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-express ``state_dict`` (canonical, or in any gauge) in the gauge of ``reference``.

    The norms take the reference's gains and biases; their readers compensate
    (``W[:, i] *= g[i] / g_ref[i]``, ``b += W_old @ beta - W_new @ beta_ref``), so the result
    computes the same function as ``state_dict``. Where a reader has no bias the norm's bias is
    instead rescaled with the gain, and differs from the reference's.

    Args:
        spec: the spec with the ``norm_folds`` (the inferred or the canonical spec).
        state_dict: the state dict to move (a canonical form, say after aligning it); not modified.
        reference: the state dict whose gains (and norm biases) the result takes; not modified.

    Returns:
        A new state dict with the reference's gains, computing what ``state_dict`` computes.

    Raises:
        SpecError: a state dict lacks a parameter a fold names, or a reference gain has zeros
            (the readers cannot be divided by it; the message names the parameter).
    """
    result = dict(state_dict)
    for fold in spec.norm_folds:
        gain = _tensor(reference, fold.gain, fold, "reference state dict")
        if bool((gain == 0).any()):
            raise SpecError(f"the reference gain {fold.gain!r} has {int((gain == 0).sum())} zero entries; "
                            "the readers of its norm cannot be expressed in that gauge")
        bias = _tensor(reference, fold.bias, fold, "reference state dict") if fold.bias is not None else None
        _regauge(fold, state_dict, result, gain, bias)
    return result


def canonical_spec(spec: PermutationSpec) -> PermutationSpec:
    """The spec of a canonical state dict: each group takes its folded kind (and ``fixes_ones``).

    The folded gains leave the groups (a gain of 1 is not kept by a general orthogonal map), and
    so do norm biases folded into the readers (they are 0); affine sites on folded gains are
    dropped (REPAIR's per-channel correction would break the larger symmetry). The folds stay,
    so that :func:`to_gauge` can take either spec.
    """
    gains = {fold.gain for fold in spec.norm_folds}
    removed = gains | {fold.bias for fold in spec.norm_folds if fold.folds_bias}
    groups = tuple(_canonical_group(group, removed) for group in spec.groups)
    sites = spec.affine_sites
    if sites is not None:
        sites = tuple(site for site in sites if site.weight not in gains)
    fields = {name: getattr(spec, name) for name in type(spec).model_fields}
    return type(spec)(**{**fields, "groups": groups, "affine_sites": sites})


def _canonical_group(group: PermutationGroup, removed: set[str]) -> PermutationGroup:
    members = tuple(member for member in group.members if member.param not in removed)
    update: dict[str, object] = {"members": members}
    if group.folded is not None:
        update.update(kind=group.folded.kind, fixes_ones=group.folded.fixes_ones,
                      kind_limited_by=group.folded.kind_limited_by, folded=None)
    return group.model_copy(update=update)


def _tensor(state_dict: Mapping[str, torch.Tensor], name: str, fold: NormFold, what: str = "state dict") -> torch.Tensor:
    try:
        return state_dict[name]
    except KeyError:
        raise SpecError(f"the {what} lacks {name!r}, which the norm fold at node {fold.node!r} needs; "
                        "is the spec for this model?") from None


def _regauge(fold: NormFold, source: Mapping[str, torch.Tensor], result: dict[str, torch.Tensor],
             new_gain: torch.Tensor, new_bias: torch.Tensor | None) -> None:
    """Write into ``result`` the fold's norm with ``new_gain`` / ``new_bias`` and readers that compensate.

    With ``n`` the normalised features, a reader computes ``W (g * n + beta) + b``. It becomes
    ``W' (g' * n + beta') + b'`` with ``W' = W diag(g / g')``; where every reader has a bias,
    ``beta' = new_bias`` and ``b' = b + W beta - W' beta'``, else ``beta' = beta * g' / g``. A
    LayerScale's writer ``g * (W x + b)`` becomes ``g' * (W' x + b')`` with ``W' = diag(g / g') W``
    and ``b' = b * g / g'``.
    """
    gain = _tensor(source, fold.gain, fold).to(torch.float64)
    target = new_gain.to(torch.float64)
    ratio = gain / target
    bias = _tensor(source, fold.bias, fold).to(torch.float64) if fold.bias is not None else None
    target_bias = None
    if bias is not None:
        if fold.folds_bias:
            target_bias = new_bias.to(torch.float64) if new_bias is not None else torch.zeros_like(bias)
        else:
            moved = bias != 0
            if bool((moved & (gain == 0)).any()):
                raise SpecError(f"the norm at node {fold.node!r} has a zero gain ({fold.gain!r}) where its bias "
                                f"({fold.bias!r}) is not zero, and a reader without bias: the bias cannot be folded")
            target_bias = torch.where(moved, bias * target / torch.where(moved, gain, 1.0), torch.zeros_like(bias))
    for reader in fold.readers:
        weight = _tensor(source, reader.weight, fold)
        old = weight.to(torch.float64)
        shape = [1, 1]
        shape[reader.axis] = -1
        new = old * ratio.reshape(shape)
        result[reader.weight] = new.to(weight.dtype)
        if reader.bias is not None and target_bias is not None and fold.folds_bias:
            reader_bias = _tensor(source, reader.bias, fold)
            shift = torch.tensordot(old, bias, dims=([reader.axis], [0])) - torch.tensordot(new, target_bias, dims=([reader.axis], [0]))
            result[reader.bias] = (reader_bias.to(torch.float64) + shift).to(reader_bias.dtype)
    for writer in fold.writers:  # a LayerScale: gain * (W x + b) = (g' * ((g / g') * (W x + b))
        weight = _tensor(source, writer.weight, fold)
        shape = [1, 1]
        shape[writer.axis] = -1
        result[writer.weight] = (weight.to(torch.float64) * ratio.reshape(shape)).to(weight.dtype)
        if writer.bias is not None:
            writer_bias = _tensor(source, writer.bias, fold)
            result[writer.bias] = (writer_bias.to(torch.float64) * ratio).to(writer_bias.dtype)
    original_gain = source[fold.gain]
    result[fold.gain] = target.to(original_gain.dtype)
    if bias is not None and target_bias is not None:
        result[fold.bias] = target_bias.to(source[fold.bias].dtype)
