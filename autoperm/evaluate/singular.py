"""Singular-value analysis of weight matching (Ito et al., arXiv 2402.04051, finding 2 and 3).

For ``W = U S V^T`` a permutation moves singular vectors but never singular values:
``P_out W P_in^T = (P_out U) S (P_in V)^T``. The weight-matching objective decomposes as
``<W_A, W_B> = sum_ij s^A_i s^B_j (u^A_i . u^B_j)(v^A_i . v^B_j)``, so matching mostly aligns the
singular vectors with large singular values. Ito et al.'s alignment pools over layers,

    R = sum_l sum_{i, j <= n_l} (u^A_i . u^B_j)(v^A_i . v^B_j) / sum_l n_l,

with ``n_l`` the number of singular values ``>= gamma * s_max`` of layer ``l`` (recounted for
every ``gamma``; the paper reports 0 and 0.3). Per layer, ``R_l`` is the same sum over one layer
divided by its ``n_l``, so ``R = sum_l n_l R_l / sum_l n_l``. Both are 1 for identical weights
and about 0 for unrelated ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from autoperm.evaluate.barrier import check_compatible
from autoperm.evaluate.distance import is_statistic
from autoperm.spec import PermutationSpec, apply_permutation, random_permutation

__all__ = [
    "LayerAlignment",
    "SingularAnalysis",
    "singular_analyses",
    "singular_analysis",
    "singular_value_change",
    "weight_matrices",
]


@dataclass(frozen=True)
class LayerAlignment:
    """One layer's spectra and alignment.

    Attributes:
        name: the state-dict name of the weight.
        shape: the matrix it was analysed as, ``(out, in * kh * kw * ...)``.
        singular_values_a: singular values of A, descending.
        singular_values_b: singular values of B, descending.
        num_vectors: ``n_l``, the number of leading singular vectors in ``alignment``.
        alignment: ``R_l``.
    """

    name: str
    shape: tuple[int, int]
    singular_values_a: tuple[float, ...]
    singular_values_b: tuple[float, ...]
    num_vectors: int
    alignment: float

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "num_vectors": self.num_vectors,
            "alignment": self.alignment,
            "singular_values_a": list(self.singular_values_a),
            "singular_values_b": list(self.singular_values_b),
        }


@dataclass(frozen=True)
class SingularAnalysis:
    """Per-layer alignment of B's singular vectors with A's.

    Attributes:
        gamma: threshold; a singular vector counts when ``s >= gamma * s_max``.
        layers: one :class:`LayerAlignment` per weight with two or more dimensions.
        alignment: ``R`` as Ito et al. define it, pooled over layers:
            ``sum_l sum_{i,j<=n_l} (u^A_i . u^B_j)(v^A_i . v^B_j) / sum_l n_l``
            (equal to ``sum_l n_l R_l / sum_l n_l``); the headline number.
        mean_layer_alignment: the unweighted mean of ``R_l`` over layers (every layer counts the
            same whatever its ``n_l``); not the paper's ``R``.
        invariance_error: largest relative change of B's singular values under a random
            permutation of the spec (float rounding only, about 1e-6 or less); ``None`` without a spec.
    """

    gamma: float
    layers: tuple[LayerAlignment, ...]
    alignment: float
    mean_layer_alignment: float
    invariance_error: float | None

    def to_dict(self, spectra: bool = True) -> dict[str, object]:
        """Plain data for JSON; ``spectra=False`` leaves out the singular values."""
        layers = []
        for layer in self.layers:
            entry = layer.to_dict()
            if not spectra:
                entry.pop("singular_values_a")
                entry.pop("singular_values_b")
            layers.append(entry)
        return {
            "gamma": self.gamma,
            "alignment": self.alignment,
            "mean_layer_alignment": self.mean_layer_alignment,
            "invariance_error": self.invariance_error,
            "layers": layers,
        }


def weight_matrices(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every learned tensor with at least two dimensions, as a float64 ``(out, -1)`` matrix.

    Conv weights ``(out, in, kh, kw)`` become ``(out, in * kh * kw)``.
    """
    return {
        name: tensor.detach().to(torch.float64).reshape(tensor.shape[0], -1)
        for name, tensor in state_dict.items()
        if tensor.dim() >= 2 and not is_statistic(name, tensor)
    }


def _alignment(
    u_a: torch.Tensor, s_a: torch.Tensor, v_a: torch.Tensor,
    u_b: torch.Tensor, s_b: torch.Tensor, v_b: torch.Tensor,
    gamma: float,
) -> tuple[int, float]:
    count_a = int((s_a >= gamma * s_a[0]).sum()) if s_a[0] > 0 else 0
    count_b = int((s_b >= gamma * s_b[0]).sum()) if s_b[0] > 0 else 0
    n = min(count_a, count_b)
    if n == 0:
        return 0, 0.0
    overlap_u = u_a[:, :n].T @ u_b[:, :n]
    overlap_v = v_a[:, :n].T @ v_b[:, :n]
    return n, float((overlap_u * overlap_v).sum() / n)


def singular_analysis(
    spec: PermutationSpec | None,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    gamma: float = 0.3,
    seed: int = 0,
) -> SingularAnalysis:
    """Compare the singular vectors of every weight matrix of B with those of A.

    ``n_l`` is the smaller of the two models' counts of singular values ``>= gamma * s_max``
    (each model's own ``s_max``), so neither side contributes a direction below its threshold.
    Singular vectors are only defined up to a joint sign flip of ``u_i, v_i``, and
    ``(u^A_i . u^B_j)(v^A_i . v^B_j)`` is invariant to it; within a degenerate singular value the
    sum is invariant to the choice of basis too.

    Args:
        spec: the permutation spec, used to check on B that a random permutation leaves its
            singular values unchanged (``invariance_error``); ``None`` skips the check.
        sd_a: state dict of A.
        sd_b: state dict of B (as trained, aligned to A, or a merged model).
        gamma: threshold in [0, 1); Ito et al. use 0 and 0.3.
        seed: seed of the random permutation of the check.

    Returns:
        A :class:`SingularAnalysis`; ``alignment`` is Ito et al.'s pooled ``R``.

    Raises:
        ValueError: ``gamma`` outside [0, 1).

    Complexity:
        One SVD per layer and model, ``O(out * in * min(out, in))``; twice more for B with a spec.

    Example:
        >>> before = singular_analysis(spec, sd_a, sd_b).alignment           # about 0
        >>> after = singular_analysis(spec, sd_a, sd_b_matched).alignment    # high after WM
    """
    return singular_analyses(spec, sd_a, sd_b, gammas=(gamma,), seed=seed)[gamma]


def singular_analyses(
    spec: PermutationSpec | None,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    gammas: Sequence[float] = (0.0, 0.3),
    seed: int = 0,
) -> dict[float, SingularAnalysis]:
    """:func:`singular_analysis` at several thresholds, sharing the SVDs (Ito et al. report 0 and 0.3).

    Args:
        spec, sd_a, sd_b, seed: as for :func:`singular_analysis`.
        gammas: thresholds in [0, 1); ``n_l`` and the denominator of ``R`` are recounted for each.

    Returns:
        ``{gamma: SingularAnalysis}`` in the order of ``gammas``.

    Raises:
        ValueError: a ``gamma`` outside [0, 1).

    Example:
        >>> r = {g: a.alignment for g, a in singular_analyses(spec, sd_a, sd_b_matched).items()}
    """
    for gamma in gammas:
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
    check_compatible(sd_a, sd_b)
    matrices_a = weight_matrices(sd_a)
    matrices_b = weight_matrices(sd_b)
    decompositions = []
    for name, a in matrices_a.items():
        u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(matrices_b[name], full_matrices=False)
        decompositions.append((name, tuple(a.shape), (u_a, s_a, vh_a.T), (u_b, s_b, vh_b.T)))
    invariance = singular_value_change(spec, sd_b, seed=seed) if spec is not None else None
    results = {}
    for gamma in gammas:
        layers = []
        for name, shape, side_a, side_b in decompositions:
            n, r = _alignment(*side_a, *side_b, gamma)
            layers.append(
                LayerAlignment(
                    name=name,
                    shape=(int(shape[0]), int(shape[1])),
                    singular_values_a=tuple(side_a[1].tolist()),
                    singular_values_b=tuple(side_b[1].tolist()),
                    num_vectors=n,
                    alignment=r,
                )
            )
        total = sum(layer.num_vectors for layer in layers)
        results[gamma] = SingularAnalysis(
            gamma=gamma,
            layers=tuple(layers),
            alignment=sum(layer.num_vectors * layer.alignment for layer in layers) / total if total else 0.0,
            mean_layer_alignment=sum(layer.alignment for layer in layers) / len(layers) if layers else 0.0,
            invariance_error=invariance,
        )
    return results


def singular_value_change(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], seed: int = 0) -> float:
    """Largest relative change of any weight's singular values under a random spec permutation.

    Checks finding 2 of Ito et al.: permutations never change singular values. Each layer's
    change is ``max_i |s_i - s'_i| / s_max`` (computed in float64).

    Returns:
        The largest change over layers: float rounding only, unless the spec is wrong.
    """
    permuted = apply_permutation(spec, random_permutation(spec, seed=seed), state_dict)
    before = weight_matrices(state_dict)
    after = weight_matrices(permuted)
    worst = 0.0
    for name, matrix in before.items():
        s = torch.linalg.svdvals(matrix)
        s_permuted = torch.linalg.svdvals(after[name])
        scale = float(s[0]) if float(s[0]) > 0 else 1.0
        worst = max(worst, float((s - s_permuted).abs().max()) / scale)
    return worst
