"""autoperm: find the permutation symmetries of any PyTorch model; align, compare and merge models.

The flow is one way: trace -> axis graph -> groups -> spec -> solvers -> apply -> evaluate.
References: Ainsworth et al., "Git Re-Basin" (arXiv 2209.04836); Ito et al., "Analysis of
Linear Mode Connectivity via Permutation-Based Weight Matching" (arXiv 2402.04051).
"""

from autoperm.errors import (
    AutopermError,
    CheckpointError,
    DataError,
    InputMismatchError,
    ModelLoadError,
    SolverError,
    SpecError,
    TraceError,
)
from autoperm.spec import (
    ActivationSite,
    AffineSite,
    Member,
    PermutationGroup,
    PermutationSpec,
    apply_permutation,
    apply_transform,
    canonicalize,
    identity_permutation,
    invert_permutation,
    random_permutation,
    random_transform,
    to_gauge,
)
from autoperm.infer import UnsupportedOpWarning, infer_spec, register_alias, register_module_rule, register_op_rule
from autoperm.verify import VerifyReport, verify_spec

from autoperm.io import load_state_dict, save_state_dict
from autoperm.solvers import (
    Alignment,
    GeneralizedResult,
    MatchingResult,
    MergeResult,
    SteResult,
    align,
    generalized_activation_matching,
    generalized_matching,
    merge_many,
    ste_matching,
    weight_matching,
)

from autoperm.api import Repairer, activation_matching, repair
from autoperm.data import load_data, load_digits
from autoperm.evaluate import (
    InterpolationCurve,
    SingularAnalysis,
    accuracy_barrier,
    barrier_summary,
    interpolation_curve,
    l2_distance,
    loss_barrier,
    RepairResult,
    repair_sites,
    reset_bn_stats,
    singular_analyses,
    singular_analysis,
)

__version__ = "0.1.0"

__all__ = [
    "Alignment",
    "GeneralizedResult",
    "align",
    "generalized_activation_matching",
    "generalized_matching",
    "MatchingResult",
    "MergeResult",
    "SteResult",
    "activation_matching",
    "merge_many",
    "ste_matching",
    "load_state_dict",
    "save_state_dict",
    "weight_matching",
    "DataError",
    "InterpolationCurve",
    "SingularAnalysis",
    "accuracy_barrier",
    "barrier_summary",
    "interpolation_curve",
    "l2_distance",
    "load_data",
    "load_digits",
    "loss_barrier",
    "RepairResult",
    "Repairer",
    "repair",
    "repair_sites",
    "reset_bn_stats",
    "singular_analyses",
    "singular_analysis",
    "ActivationSite",
    "AffineSite",
    "AutopermError",
    "CheckpointError",
    "Member",
    "InputMismatchError",
    "ModelLoadError",
    "PermutationGroup",
    "PermutationSpec",
    "SolverError",
    "SpecError",
    "TraceError",
    "apply_permutation",
    "apply_transform",
    "identity_permutation",
    "invert_permutation",
    "random_permutation",
    "random_transform",
    "UnsupportedOpWarning",
    "VerifyReport",
    "infer_spec",
    "register_alias",
    "register_module_rule",
    "register_op_rule",
    "verify_spec",
]
