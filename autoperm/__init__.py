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

from autoperm.checkpoint import load_state_dict, save_state_dict
from autoperm.solvers import (
    MatchingResult,
    MergeResult,
    activation_matching,
    merge_many,
    ste_matching,
    weight_matching,
)

__version__ = "0.1.0"

__all__ = [
    "MatchingResult",
    "MergeResult",
    "activation_matching",
    "merge_many",
    "ste_matching",
    "load_state_dict",
    "save_state_dict",
    "weight_matching",
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
