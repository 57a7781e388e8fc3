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
from autoperm.spec.canonical import canonical_spec, canonicalize, to_gauge
from autoperm.spec.kinds import KINDS
from autoperm.spec.schema import (
    ActivationSite,
    AffineSite,
    Completeness,
    FixedAxis,
    FoldedKind,
    Layout,
    Member,
    NormFold,
    PermutationGroup,
    PermutationSpec,
    Reader,
)
from autoperm.spec.transform import Transforms, apply_transform, check_transforms, random_transform

__all__ = [
    "KINDS",
    "canonical_spec",
    "canonicalize",
    "to_gauge",
    "FoldedKind",
    "NormFold",
    "Reader",
    "Transforms",
    "apply_transform",
    "check_transforms",
    "random_transform",
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
