"""autoperm: find the permutation symmetries of any PyTorch model; align, compare and merge models.

The flow is one way: trace -> axis graph -> groups -> spec -> solvers -> apply -> evaluate.
References: Ainsworth et al., "Git Re-Basin" (arXiv 2209.04836); Ito et al., "Analysis of
Linear Mode Connectivity via Permutation-Based Weight Matching" (arXiv 2402.04051).
"""

from autoperm.errors import AutopermError, CheckpointError, ModelLoadError, SolverError, SpecError, TraceError
from autoperm.spec import (
    ActivationSite,
    Member,
    PermutationGroup,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    invert_permutation,
    random_permutation,
)

__version__ = "0.1.0"

__all__ = [
    "ActivationSite",
    "AutopermError",
    "CheckpointError",
    "Member",
    "ModelLoadError",
    "PermutationGroup",
    "PermutationSpec",
    "SolverError",
    "SpecError",
    "TraceError",
    "apply_permutation",
    "identity_permutation",
    "invert_permutation",
    "random_permutation",
]
