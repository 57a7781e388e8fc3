"""Evaluation: linear mode connectivity (barriers), parameter distance and singular-vector alignment.

These are the measurements of Ito et al., "Analysis of Linear Mode Connectivity via
Permutation-Based Weight Matching" (arXiv 2402.04051), on top of Git Re-Basin's barriers
(arXiv 2209.04836). Plots live in :mod:`autoperm.evaluate.plots` (imported on demand, since it
loads matplotlib).
"""

from autoperm.evaluate.barrier import (
    Evaluator,
    InterpolationCurve,
    accuracy_barrier,
    barrier_summary,
    evaluate_model,
    interpolate_state_dicts,
    interpolation_curve,
    loss_barrier,
    reset_bn_stats,
)
from autoperm.evaluate.distance import Distance, l2_distance
from autoperm.evaluate.repair import RepairResult, RepairSite, Repairer, repair_sites
from autoperm.evaluate.singular import (
    LayerAlignment,
    SingularAnalysis,
    singular_analyses,
    singular_analysis,
    singular_value_change,
    weight_matrices,
)

__all__ = [
    "Distance",
    "Evaluator",
    "InterpolationCurve",
    "LayerAlignment",
    "RepairResult",
    "RepairSite",
    "Repairer",
    "SingularAnalysis",
    "accuracy_barrier",
    "barrier_summary",
    "evaluate_model",
    "interpolate_state_dicts",
    "interpolation_curve",
    "l2_distance",
    "loss_barrier",
    "repair_sites",
    "reset_bn_stats",
    "singular_analyses",
    "singular_analysis",
    "singular_value_change",
    "weight_matrices",
]
