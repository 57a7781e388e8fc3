"""Symmetry kinds: which transforms a group admits, beyond permutations.

A group's transform ``T`` (``size x size``) acts along every member axis position block as
``new[i] = sum_j T[i, j] old[j]`` (a permutation is ``T[i, p[i]] = 1``). An axis that *writes*
the group's activation (a linear layer's output rows, its bias, an embedding's columns; role
``"out"``) moves by ``T``; an axis that *reads* it (a linear layer's input columns; role
``"in"``) by ``T^-T``, so that ``W_in T^-1 T W_out`` computes what ``W_in W_out`` did.

The kinds, as sets of matrices:

- ``permutation``: permutation matrices (every group admits them; roles do not matter);
- ``scale``: positive diagonal matrices times permutations (through ReLU-like ops);
- ``orthogonal``: orthogonal matrices (``T^-T = T``, roles do not matter);
- ``invertible``: every invertible matrix (contains the others).

A group may also carry ``fixes_ones`` (:class:`autoperm.spec.PermutationGroup`): its transforms
must then map the all-ones vector onto itself, as a LayerNorm without gain requires.

``scale`` and ``orthogonal`` are not nested. A group admits a downward-closed set of kinds
(:func:`admitted`) and the spec records the largest one (:func:`largest`).
Reference: Theus et al., "Generalized Linear Mode Connectivity for Transformers", arXiv 2506.22712.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

__all__ = ["Kind", "Role", "KINDS", "ROLE_FREE", "PERMUTATION_ONLY", "ALL_KINDS", "admitted", "largest", "closure"]

Kind = Literal["permutation", "scale", "orthogonal", "invertible"]
Role = Literal["in", "out"]

KINDS: tuple[str, ...] = ("permutation", "scale", "orthogonal", "invertible")
"""Every kind, smallest first (the order in which a larger kind is preferred when reporting)."""

_BELOW: dict[str, frozenset[str]] = {
    "permutation": frozenset({"permutation"}),
    "scale": frozenset({"permutation", "scale"}),
    "orthogonal": frozenset({"permutation", "orthogonal"}),
    "invertible": frozenset(KINDS),
}

PERMUTATION_ONLY: frozenset[str] = _BELOW["permutation"]
ALL_KINDS: frozenset[str] = _BELOW["invertible"]
ROLE_FREE: frozenset[str] = _BELOW["orthogonal"]
"""Kinds whose transforms satisfy ``T^-T = T``, so a member needs no role."""


def admitted(kind: str) -> frozenset[str]:
    """The kinds whose transforms a group of kind ``kind`` also admits (``"scale"`` -> permutation, scale)."""
    return _BELOW[kind]


def closure(kinds: Iterable[str]) -> frozenset[str]:
    """``kinds`` with every smaller kind added (an op that preserves invertible maps preserves the rest)."""
    found: set[str] = set()
    for kind in kinds:
        found |= _BELOW[kind]
    return frozenset(found)


def largest(kinds: Iterable[str]) -> str:
    """The kind reported for a group admitting ``kinds``: invertible, else orthogonal, else scale, else permutation."""
    given = set(kinds)
    for kind in ("invertible", "orthogonal", "scale"):
        if kind in given:
            return kind
    return "permutation"
