"""The axis graph: a networkx graph over (tensor, axis) nodes whose components are permutations.

Rules add three kinds of facts:
- ``same(a, b)``: axes ``a`` and ``b`` get the same permutation (an edge); ``same(a, b,
  dual=True)`` also says that ``b`` is contracted against ``a`` (attention's queries and keys),
  so where ``a`` moves by an invertible ``M``, ``b`` moves by ``M^-T`` (:meth:`AxisGraph.polarity`);
- ``define(x, "product" | "concat", children)``: axis ``x`` is the row-major product of its
  children (a flatten / reshape) or their concatenation (cat / split);
- ``fix(a)``: axis ``a`` is never permuted (model inputs and outputs, mixing ops, unknown ops).

:meth:`AxisGraph.resolve` reconciles the definitions that meet in one component (a product met
by another product of a different factorisation is refined; mismatches are fixed) until nothing
changes, then propagates fixedness from composite axes to their parts. The components with no
definition, not fixed and larger than one index are the permutation groups.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import networkx as nx

__all__ = ["AxisGraph", "Definition", "Polarity", "Resolved"]

logger = logging.getLogger(__name__)

Node = Hashable


@dataclass(frozen=True)
class Definition:
    """``node`` is the product or concatenation of ``children`` (sizes multiply or add up)."""

    kind: str
    children: tuple[Node, ...]


@dataclass
class Resolved:
    """Components of a resolved axis graph."""

    component: dict[Node, int]
    members: list[list[Node]]
    definitions: dict[int, list[Definition]]
    fixed: set[int]
    size: dict[int, int]
    order: dict[Node, int] = field(default_factory=dict)
    why_fixed: dict[int, list[str]] = field(default_factory=dict)


@dataclass
class Polarity:
    """Which way axes move under an invertible map of their component (:meth:`AxisGraph.polarity`).

    ``parity[node]`` is 0 where the axis moves like the component's first axis and 1 where it
    moves dual to it; ``owner[component]`` is the parity of the axes whose definitions the
    component's parts come from; ``ambiguous`` holds the components where polarity is unknown.
    """

    parity: dict[Node, int] = field(default_factory=dict)
    owner: dict[int, int] = field(default_factory=dict)
    ambiguous: set[int] = field(default_factory=set)

    def of(self, node: Node) -> int:
        return self.parity.get(node, 0)


class AxisGraph:
    """Facts about tensor axes, added by op rules and resolved into permutation groups."""

    def __init__(self) -> None:
        self.graph = nx.Graph()
        self.sizes: dict[Node, int] = {}
        self.definitions: dict[Node, list[Definition]] = {}
        self.fixed_nodes: set[Node] = set()
        self.reasons: dict[Node, str] = {}  # why each fixed node is fixed (the first reason given)
        self.reason = "kept fixed"  # what the caller is doing now; recorded with every fix
        self.dual_conflicts: set[Node] = set()  # axes declared both like and dual to one another
        self._atoms = 0

    # ------------------------------------------------------------------ building
    def node(self, node: Node, size: int) -> Node:
        if node not in self.sizes:
            self.sizes[node] = size
            self.graph.add_node(node)
        return node

    def atom(self, size: int) -> Node:
        """A fresh axis that belongs to no tensor (a factor of a reshape, a head, ...)."""
        self._atoms += 1
        return self.node(("atom", self._atoms), size)

    def same(self, a: Node, b: Node, dual: bool = False) -> bool:
        """Axes ``a`` and ``b`` share one permutation (with ``dual``, ``b`` is contracted against
        ``a``: it moves by the inverse transpose of ``a``'s map). Returns whether the graph changed."""
        size_a, size_b = self.sizes[a], self.sizes[b]
        if size_a != size_b:
            logger.debug("axes %s (%d) and %s (%d) differ in size; fixing both", a, size_a, b, size_b)
            return self.fix(a, f"{self.reason} (couples axes of different sizes)") | self.fix(b, f"{self.reason} (couples axes of different sizes)")
        if size_a == 1:
            return False
        if a == b or self.graph.has_edge(a, b):
            if dual != (a != b and self.graph.edges[a, b].get("dual", False)):
                self.dual_conflicts.update((a, b))  # ``q k^T`` with q and k one tensor: only M = M^-T
            return False
        self.graph.add_edge(a, b, dual=dual)
        return True

    def fix(self, node: Node, reason: str | None = None) -> bool:
        """Axis ``node`` is never permuted; ``reason`` (default: the current ``reason``) says why."""
        if node in self.fixed_nodes:
            return False
        self.fixed_nodes.add(node)
        self.reasons[node] = reason or self.reason
        return True

    def define(self, node: Node, kind: str, children: Sequence[Node]) -> bool:
        """Declare ``node`` the ``kind`` ("product" or "concat") of ``children``."""
        children = tuple(c for c in children if self.sizes[c] > 1 or kind == "concat" and self.sizes[c] > 0)
        combine = math.prod if kind == "product" else sum
        if combine(self.sizes[c] for c in children) != self.sizes[node]:
            raise AssertionError(f"{kind} of {[self.sizes[c] for c in children]} != {self.sizes[node]}")
        if not children:
            return False
        if len(children) == 1:
            return self.same(node, children[0])
        definition = Definition(kind, children)
        existing = self.definitions.setdefault(node, [])
        if definition in existing:
            return False
        existing.append(definition)
        return True

    # ----------------------------------------------------------------- resolving
    def resolve(self) -> Resolved:
        """Reconcile definitions to a fixed point; return the components."""
        seen_pairs: set[tuple[Definition, Definition]] = set()
        while True:
            component = self._components()
            changed = False
            by_component: dict[int, list[Definition]] = {}
            for node, defs in self.definitions.items():
                by_component.setdefault(component[node], []).extend(defs)
            for defs in by_component.values():
                first = defs[0]
                for other in defs[1:]:
                    if other == first or (first, other) in seen_pairs:
                        continue
                    seen_pairs.add((first, other))
                    changed |= self._reconcile(first, other)
            if not changed:
                break
        return self._finish()

    def _components(self) -> dict[Node, int]:
        order = self._order()
        component: dict[Node, int] = {}
        groups = [sorted(c, key=order.__getitem__) for c in nx.connected_components(self.graph)]
        groups.sort(key=lambda nodes: order[nodes[0]])
        for index, nodes in enumerate(groups):
            for node in nodes:
                component[node] = index
        return component

    def _reconcile(self, first: Definition, second: Definition) -> bool:
        sizes_a = [self.sizes[c] for c in first.children]
        sizes_b = [self.sizes[c] for c in second.children]
        if first.kind != second.kind:
            return self._fix_all(first.children + second.children)
        combine = (lambda xs: list(accumulate(xs, lambda x, y: x * y))) if first.kind == "product" else (lambda xs: list(accumulate(xs)))
        marks_a, marks_b = combine(sizes_a), combine(sizes_b)
        boundaries = sorted(set(marks_a) & set(marks_b))
        changed = False
        start_a = start_b = 0
        for boundary in boundaries:
            end_a = marks_a.index(boundary) + 1
            end_b = marks_b.index(boundary) + 1
            part_a, part_b = first.children[start_a:end_a], second.children[start_b:end_b]
            if len(part_a) == 1 and len(part_b) == 1:
                changed |= self.same(part_a[0], part_b[0])
            elif len(part_a) == 1:
                changed |= self.define(part_a[0], first.kind, part_b)
            elif len(part_b) == 1:
                changed |= self.define(part_b[0], first.kind, part_a)
            else:
                changed |= self._refine(first.kind, part_a, part_b)
            start_a, start_b = end_a, end_b
        return changed

    def _refine(self, kind: str, part_a: tuple[Node, ...], part_b: tuple[Node, ...]) -> bool:
        """Split two factorisations of one axis into their common refinement.

        ``(2, 4)`` against ``(4, 2)`` becomes ``(2, 2, 2)``: each factor is declared the product
        (or concatenation) of fresh pieces both sides share. Where no common refinement exists
        (a product boundary that does not divide), the factors are fixed.
        """
        if kind == "product":
            marks_a = list(accumulate((self.sizes[c] for c in part_a), lambda x, y: x * y))
            marks_b = list(accumulate((self.sizes[c] for c in part_b), lambda x, y: x * y))
        else:
            marks_a = list(accumulate(self.sizes[c] for c in part_a))
            marks_b = list(accumulate(self.sizes[c] for c in part_b))
        marks = sorted(set(marks_a) | set(marks_b))
        base = 1 if kind == "product" else 0
        if kind == "product" and any(m % p for p, m in zip([base] + marks[:-1], marks)):
            return self._fix_all(part_a + part_b)
        pieces = []
        previous = base
        for mark in marks:
            pieces.append(self.atom(mark // previous if kind == "product" else mark - previous))
            previous = mark
        changed = False
        for part, part_marks in ((part_a, marks_a), (part_b, marks_b)):
            index = 0
            for child, end in zip(part, part_marks):
                own = []
                while index < len(marks) and marks[index] <= end:
                    own.append(pieces[index])
                    index += 1
                changed |= self.define(child, kind, own)
        return changed

    def polarity(self, resolved: Resolved) -> Polarity:
        """Which way each axis moves under an invertible map of its component, relative to the
        component's first axis: ``0`` alike, ``1`` dual (``M`` against ``M^-T``); and the
        components where that is ambiguous.

        Polarity flips across ``dual`` edges. A component is ambiguous where two paths disagree
        (an odd cycle, or an axis declared dual to itself), where it is part of an ambiguous
        axis, or where it is part of two definitions whose axes have opposite polarity (their
        parts were coupled as alike). Its group then keeps the kinds that need no polarity
        (permutations, orthogonal maps). Without dual edges every axis is 0 and none is ambiguous.
        """
        if not self.dual_conflicts and not any(dual for _, _, dual in self.graph.edges(data="dual", default=False)):
            return Polarity()
        parity: dict[Node, int] = {}
        ambiguous: set[int] = set()
        for index, nodes in enumerate(resolved.members):
            start = nodes[0]
            parity[start] = 0
            for a, b in nx.bfs_edges(self.graph, start):
                parity[b] = parity[a] ^ int(self.graph.edges[a, b].get("dual", False))
            inside = self.graph.subgraph(nodes).edges(data="dual", default=False)
            if any(node in self.dual_conflicts for node in nodes) or any(parity[a] ^ parity[b] != int(dual) for a, b, dual in inside):
                ambiguous.add(index)
        owners: dict[int, set[int]] = {}
        for node in self.definitions:
            owners.setdefault(resolved.component[node], set()).add(parity[node])
        split = {index for index, found in owners.items() if len(found) > 1}  # its definitions' parts: ambiguous
        stack = list(ambiguous | split)
        while stack:  # the parts of an ambiguous axis are ambiguous
            index = stack.pop()
            for definition in resolved.definitions.get(index, ()):
                for child in definition.children:
                    if resolved.component[child] not in ambiguous:
                        ambiguous.add(resolved.component[child])
                        stack.append(resolved.component[child])
        owner = {index: min(found) for index, found in owners.items()}
        return Polarity(parity, owner, ambiguous)

    def _fix_all(self, nodes: Iterable[Node]) -> bool:
        nodes = list(nodes)
        where = sorted({str(n[0]) for n in nodes if isinstance(n, tuple) and n and n[0] != "atom"})
        reason = "reshapes factorise this axis incompatibly" + (f" (at {', '.join(where[:3])})" if where else "")
        changed = False
        for node in nodes:
            changed |= self.fix(node, reason)
        return changed

    def _order(self) -> dict[Node, int]:
        return {node: index for index, node in enumerate(self.sizes)}

    def _finish(self) -> Resolved:
        order = self._order()
        component = self._components()
        members: list[list[Node]] = [[] for _ in range(max(component.values(), default=-1) + 1)]
        for node in sorted(component, key=order.__getitem__):
            members[component[node]].append(node)
        definitions: dict[int, list[Definition]] = {}
        for node, defs in self.definitions.items():
            definitions.setdefault(component[node], []).extend(defs)
        size = {index: self.sizes[nodes[0]] for index, nodes in enumerate(members)}
        why: dict[int, list[str]] = {}
        for node in sorted(self.fixed_nodes, key=order.__getitem__):
            reasons = why.setdefault(component[node], [])
            if self.reasons.get(node, "kept fixed") not in reasons:
                reasons.append(self.reasons.get(node, "kept fixed"))
        fixed = set(why)
        stack = list(fixed)
        while stack:  # a fixed composite axis fixes its parts
            index = stack.pop()
            for definition in definitions.get(index, ()):
                for child in definition.children:
                    child_index = component[child]
                    if child_index not in fixed:
                        fixed.add(child_index)
                        why[child_index] = why[index]
                        stack.append(child_index)
        return Resolved(component, members, definitions, fixed, size, order, why)
