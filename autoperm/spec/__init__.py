"""Permutation specs: the declarative description of a model's permutation groups."""

from autoperm.spec.apply import (
    Permutations,
    apply_permutation,
    check_permutations,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    layout_positions,
    member_matrix,
    permute_tensor,
    random_permutation,
)
from autoperm.spec.schema import (
    ActivationSite,
    AffineSite,
    Completeness,
    FixedAxis,
    Layout,
    Member,
    PermutationGroup,
    PermutationSpec,
)

__all__ = [
    "ActivationSite",
    "AffineSite",
    "Completeness",
    "FixedAxis",
    "Layout",
    "Member",
    "PermutationGroup",
    "PermutationSpec",
    "Permutations",
    "apply_permutation",
    "check_permutations",
    "compose_permutations",
    "identity_permutation",
    "invert_permutation",
    "layout_positions",
    "member_matrix",
    "permute_tensor",
    "random_permutation",
]
