"""Solvers that find the permutations aligning one model to another, and merge several models.

- :func:`weight_matching`: coordinate descent on ``<W_A, pi(W_B)>`` (Git Re-Basin).
- :func:`ste_matching`: straight-through estimator on the midpoint loss (Git Re-Basin; STE-MM's recipe).
- :func:`activation_matching`: correlation of recorded activations (Git Re-Basin, Section 3.1).
- :func:`merge_many`: MergeMany and the anchor scheme of Ito et al. (arXiv 2402.04051).
- :func:`generalized_matching`: weight matching with orthogonal maps where groups admit them.
- :func:`generalized_activation_matching`: the same on recorded activations (Procrustes on their
  cross moments).
- :func:`align`: canonical forms, balanced gauges, generalised matching and learned maps
  (Theus et al., arXiv 2506.22712), B written back in A's gauge.
- :func:`refine`: the learned maps of an alignment: continuous maps by a parametrisation,
  permutations straight-through.
"""

from autoperm.solvers.activation_matching import activation_matching
from autoperm.solvers.align import Alignment, align
from autoperm.solvers.gauge import balancing_transforms
from autoperm.solvers.generalized import SYMMETRIES, GeneralizedResult, generalized_matching
from autoperm.solvers.generalized_activation import GeneralizedActivationResult, generalized_activation_matching
from autoperm.solvers.merge import mean_state_dict, merge_many
from autoperm.solvers.refine import refine
from autoperm.solvers.result import MatchingResult, MergeResult, check_state_dicts
from autoperm.solvers.ste import SteResult, midpoint_loss, ste_matching
from autoperm.solvers.weight_matching import weight_matching

__all__ = [
    "SYMMETRIES",
    "Alignment",
    "GeneralizedActivationResult",
    "GeneralizedResult",
    "MatchingResult",
    "MergeResult",
    "SteResult",
    "activation_matching",
    "align",
    "balancing_transforms",
    "check_state_dicts",
    "generalized_activation_matching",
    "generalized_matching",
    "mean_state_dict",
    "merge_many",
    "midpoint_loss",
    "refine",
    "ste_matching",
    "weight_matching",
]
