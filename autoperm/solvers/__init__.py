"""Solvers that find the permutations aligning one model to another, and merge several models.

- :func:`weight_matching`: coordinate descent on ``<W_A, pi(W_B)>`` (Git Re-Basin).
- :func:`ste_matching`: straight-through estimator on the midpoint loss (Git Re-Basin; STE-MM's recipe).
- :func:`activation_matching`: correlation of recorded activations (Git Re-Basin, Section 3.1).
- :func:`merge_many`: MergeMany and the anchor scheme of Ito et al. (arXiv 2402.04051).
"""

from autoperm.solvers.activation_matching import activation_matching
from autoperm.solvers.merge import mean_state_dict, merge_many
from autoperm.solvers.result import MatchingResult, MergeResult, check_state_dicts
from autoperm.solvers.ste import SteResult, midpoint_loss, ste_matching
from autoperm.solvers.weight_matching import weight_matching

__all__ = [
    "MatchingResult",
    "MergeResult",
    "SteResult",
    "activation_matching",
    "check_state_dicts",
    "mean_state_dict",
    "merge_many",
    "midpoint_loss",
    "ste_matching",
    "weight_matching",
]
