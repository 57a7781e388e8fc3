"""What a rule can say about tensors: the vocabulary between the rule table and the axis graph."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

from autoperm.infer.axes import AxisGraph
from autoperm.spec.kinds import ALL_KINDS, PERMUTATION_ONLY, closure
from autoperm.spec.schema import NormFold
from autoperm.trace.graph import TensorRef, TracedGraph

__all__ = ["AffineLayout", "RuleContext"]


class AffineLayout(NamedTuple):
    """Where a call's per-channel affine lives (see :class:`autoperm.spec.AffineSite`)."""

    channel_axis: int
    weight: str
    weight_axis: int
    bias: str | None
    norm: bool = False


class RuleContext:
    """Turns statements about tensor axes into facts of an :class:`AxisGraph`.

    Axes are addressed as ``(tensor, dim)``; negative dims count from the end.

    Besides the axis graph it records the symmetry kinds: for every node, the kinds that every
    call touching it preserves (``kinds``), the first call that excluded each other kind
    (``excluded_by``), and for state tensor axes the roles the rules gave them (``roles``).

    Where norm gains can be folded into the layers that read them (``fold_overrides``, set
    before the rules run), it also records the kinds with those gains folded (``folded_kinds``,
    ``folded_excluded_by``) and the axes whose maps must then fix the all-ones vector
    (``ones_fixed``): the same record, except that on the calls of a foldable norm the
    overrides say what each axis admits (``None``: the axis is ignored, as a folded gain is).
    """

    def __init__(self, traced: TracedGraph, axes: AxisGraph | None = None):
        self.traced = traced
        self.axes = axes or AxisGraph()
        self.producers: list[tuple[str, int]] = []
        self.mixed: list[Hashable] = []
        self.module_name: str | None = None
        self.touched: set[tuple[str, int]] = set()  # axes the current rule has spoken about
        self.affine: dict[str, AffineLayout] = {}  # node -> the per-channel affine on its output
        self.constants = {ref.id for ref in traced.constants}
        self.rule_kinds: frozenset[str] = PERMUTATION_ONLY  # what the current call's op preserves
        self.carried: dict[Hashable, frozenset[str]] = {}  # node -> kinds the current call carries on it
        self.call_nodes: list[Hashable] = []  # nodes the current call reached without a tensor (atoms)
        self.kinds: dict[Hashable, frozenset[str]] = {}
        self.excluded_by: dict[Hashable, dict[str, tuple[int, str]]] = {}
        self.roles: dict[Hashable, set[str]] = {}
        self.linked: list[Hashable] = []  # tensor axes the current call coupled or fixed
        self.norm_folds: tuple[NormFold, ...] = ()
        self.fold_overrides: dict[str, dict[Hashable, tuple[frozenset[str], bool] | None]] = {}
        self.fold_descriptions: dict[str, str] = {}  # node -> the foldable norm it belongs to
        self.folded_kinds: dict[Hashable, frozenset[str]] = {}
        self.folded_excluded_by: dict[Hashable, dict[str, tuple[int, str]]] = {}
        self.ones_fixed: set[Hashable] = set()
        self._state_ids = {ref.id for ref in traced.state.values()}
        self._calls_recorded = 0

    # ------------------------------------------------------------------ axes
    def ax(self, tensor: TensorRef, dim: int) -> Hashable:
        """The axis-graph node of ``tensor``'s axis ``dim``."""
        dim = dim % tensor.ndim if tensor.ndim else 0
        self.touched.add((tensor.id, dim))
        self.linked.append((tensor.id, dim))
        return self.axes.node((tensor.id, dim), tensor.shape[dim])

    def atom(self, size: int) -> Hashable:
        """A fresh factor axis of ``size`` indices."""
        node = self.axes.atom(size)
        self.call_nodes.append(node)
        return node

    def same(self, a: TensorRef, dim_a: int, b: TensorRef, dim_b: int, dual: bool = False) -> None:
        """Axis ``dim_a`` of ``a`` and axis ``dim_b`` of ``b`` share one permutation; with ``dual``
        the op contracts them against each other (``b`` moves by the inverse transpose of ``a``'s map)."""
        self.axes.same(self.ax(a, dim_a), self.ax(b, dim_b), dual=dual)

    def same_node(self, a: Hashable, b: Hashable) -> None:
        self.call_nodes.extend((a, b))
        self.axes.same(a, b)

    def same_all(self, a: TensorRef, b: TensorRef) -> None:
        """Couple every axis of ``a`` with the same axis of ``b`` (equal shapes)."""
        for dim in range(min(a.ndim, b.ndim)):
            self.same(a, dim, b, dim)

    def fix(self, tensor: TensorRef | None, dim: int | None = None) -> None:
        """Keep axis ``dim`` (or every axis) of ``tensor`` unpermuted."""
        if tensor is None:
            return
        dims = range(tensor.ndim) if dim is None else [dim]
        for d in dims:
            self.axes.fix(self.ax(tensor, d))

    def free(self, tensor: TensorRef | None, dim: int | None = None) -> None:
        """Leave axis ``dim`` (or every axis) of ``tensor`` unconstrained, on purpose.

        The engine fixes every axis of a call's tensors that its rule says nothing about, so a
        rule that forgets an axis can never make a spec unsound; an axis that is truly free
        (constant values, broadcast copies, a symmetric reduction) is declared with this.
        """
        if tensor is None:
            return
        for d in range(tensor.ndim) if dim is None else [dim % tensor.ndim]:
            self.touched.add((tensor.id, d))

    def unread(self, tensor: TensorRef | None) -> None:
        """The call reads only ``tensor``'s shape, dtype or device, not its values: no constraint
        on its axes, and no limit on the kinds of transform they admit."""
        if tensor is None:
            return
        self.free(tensor)
        for d in range(tensor.ndim):
            self.carried.setdefault((tensor.id, d), ALL_KINDS)

    def fix_node(self, node: Hashable) -> None:
        self.call_nodes.append(node)
        self.axes.fix(node)

    def mixes(self, tensor: TensorRef, dim: int | None) -> None:
        """Record that an op combines the entries along ``dim`` (every axis when ``None``).

        Such an axis cannot index per-head permutations of the tensor's other axes.
        """
        for d in range(tensor.ndim) if dim is None else [dim]:
            self.mixed.append(self.ax(tensor, d))

    def define(self, tensor: TensorRef, dim: int, kind: str, children: Sequence[Hashable]) -> None:
        """Axis ``dim`` of ``tensor`` is the ``"product"`` or ``"concat"`` of ``children``."""
        self.axes.define(self.ax(tensor, dim), kind, children)

    def define_node(self, node: Hashable, kind: str, children: Sequence[Hashable]) -> None:
        self.call_nodes.extend((node, *children))
        self.axes.define(node, kind, children)

    # ------------------------------------------------------------- kinds
    def carries(self, tensor: TensorRef | None, dim: int | None = None, role: str | None = None,
                kinds: Sequence[str] | None = None) -> None:
        """Axis ``dim`` (every axis when ``None``) of ``tensor`` admits the op's kinds (``OpRule.kinds``).

        Only for axes the rule couples: the op must be equivariant along them under every
        transform of those kinds (a linear layer's input and output features, both operands of
        a residual add). ``kinds`` narrows the op's kinds for these axes (a contraction of two
        state tensors: orthogonal). ``role`` is the part a state tensor's axis plays: ``"out"``
        when its values become the activation (a bias, a weight's output rows, an embedding
        table), ``"in"`` when it is contracted against the activation. Constant tensors never
        carry (``x + ones`` is affine, not linear).
        """
        if tensor is None or tensor.id in self.constants or not tensor.ndim:
            return
        allowed = self.rule_kinds & (closure(kinds) if kinds is not None else ALL_KINDS)
        for d in range(tensor.ndim) if dim is None else [dim % tensor.ndim]:
            key = (tensor.id, d)
            self.carried[key] = self.carried.get(key, allowed) & allowed
            if role is not None and tensor.state_name is not None:
                self.roles.setdefault(key, set()).add(role)

    def carries_linked(self) -> None:
        """Every tensor axis the call has coupled so far, and every atom it made, carries the op's
        kinds; state tensors take role ``"out"`` (their values become the activation).

        For structural ops that only move entries (reshape, transpose, cat, slicing), which are
        linear along every axis they couple. Axes they leave free (copies) are not carried.
        """
        for key in dict.fromkeys([*self.linked, *self.call_nodes]):
            if key[0] in self.constants:
                continue
            self.carried[key] = self.carried.get(key, self.rule_kinds) & self.rule_kinds
            if key[0] in self._state_ids:
                self.roles.setdefault(key, set()).add("out")

    def narrow(self, tensor: TensorRef | None, dim: int, kinds: Sequence[str] = ("permutation",)) -> None:
        """Axis ``dim`` of ``tensor`` admits at most ``kinds`` in this call, whatever else was carried."""
        if tensor is None or not tensor.ndim:
            return
        key = (tensor.id, dim % tensor.ndim)
        self.carried[key] = self.carried.get(key, ALL_KINDS) & closure(kinds)

    def carries_node(self, node: Hashable, kinds: Sequence[str] | None = None) -> None:
        """Like :meth:`carries`, for a node that is no tensor axis (an atom such as a head's dims)."""
        allowed = self.rule_kinds & (closure(kinds) if kinds is not None else ALL_KINDS)
        self.carried[node] = self.carried.get(node, allowed) & allowed
        self.call_nodes.append(node)

    def begin_call(self, kinds: frozenset[str]) -> None:
        """Start recording the kinds of one call whose op preserves ``kinds`` on the axes it carries."""
        self.rule_kinds = kinds
        self.carried = {}
        self.call_nodes = []
        self.linked = []

    def record_kinds(self, description: str, tensors: Sequence[TensorRef | None], node: str | None = None) -> None:
        """Close the current call (graph node ``node``): every axis of ``tensors`` and every atom it
        reached admits what the call carries on it, or permutations only."""
        self._calls_recorded += 1
        keys: list[Hashable] = [(t.id, d) for t in tensors if t is not None for d in range(t.ndim)]
        keys = list(dict.fromkeys([*keys, *self.call_nodes, *self.carried]))
        for key in keys:
            self._narrow_kinds(self.kinds, self.excluded_by, key, self.carried.get(key, PERMUTATION_ONLY), description)
        if self.fold_overrides:
            override = self.fold_overrides.get(node or "", {})
            folded_description = self.fold_descriptions.get(node or "", description)
            for key in keys:
                entry = override[key] if key in override else (self.carried.get(key, PERMUTATION_ONLY), False)
                if entry is None:
                    continue
                self._narrow_kinds(self.folded_kinds, self.folded_excluded_by, key, entry[0], folded_description)
                if entry[1]:
                    self.ones_fixed.add(key)
        self.carried = {}
        self.call_nodes = []
        self.linked = []

    def _narrow_kinds(self, kinds: dict[Hashable, frozenset[str]], excluded_by: dict[Hashable, dict[str, tuple[int, str]]],
                      key: Hashable, carried: frozenset[str], description: str) -> None:
        admitted = kinds.get(key, ALL_KINDS)
        narrowed = admitted & carried
        if narrowed != admitted:
            kinds[key] = narrowed
            excluded = excluded_by.setdefault(key, {})
            for kind in admitted - narrowed:
                excluded.setdefault(kind, (self._calls_recorded, description))

    def size(self, node: Hashable) -> int:
        return self.axes.sizes[node]

    # ------------------------------------------------------------- state
    def state(self, name: str) -> TensorRef | None:
        """State tensor ``name`` of the module being handled (``None`` if it has none)."""
        full = f"{self.module_name}.{name}" if self.module_name else name
        canonical = self.traced.aliases.get(full, full)
        return self.traced.state.get(canonical)

    def producer(self, tensor: TensorRef | None, dim: int) -> None:
        """Record that state tensor ``tensor`` writes a new activation along ``dim`` (for names)."""
        if tensor is not None and tensor.state_name is not None:
            self.producers.append((tensor.state_name, dim % tensor.ndim))

    # --------------------------------------------------------- common patterns
    def elementwise(self, inputs: Sequence[TensorRef | None], out: TensorRef | None, carry: bool = False) -> None:
        """Broadcasting elementwise op: right-aligned axes of equal size are coupled.

        With ``carry``, the output axes along which no input broadcasts carry the op's kinds
        (with their input axes; state inputs take role ``"out"``); an output axis some input
        broadcasts along admits permutations only (a bias added to every token is not moved by
        a map that mixes tokens).
        """
        if out is None:
            return
        self.free(out)  # axes every input broadcasts along hold copies
        present = [t for t in inputs if t is not None]
        for tensor in present:
            offset = out.ndim - tensor.ndim
            for dim in range(tensor.ndim):
                out_dim = dim + offset
                if out_dim < 0:
                    self.fix(tensor, dim)
                    continue
                if tensor.shape[dim] == out.shape[out_dim]:
                    self.same(tensor, dim, out, out_dim)
                elif tensor.shape[dim] != 1:
                    self.fix(tensor, dim)
                    self.fix(out, out_dim)
        for out_dim in range(out.ndim if present else 0):
            full = [(t, out_dim - out.ndim + t.ndim) for t in present if out_dim - out.ndim + t.ndim >= 0]
            if len(full) < len(present) or any(t.shape[d] != out.shape[out_dim] for t, d in full):
                self.narrow(out, out_dim)
            elif carry:
                self.carries(out, out_dim)
                for tensor, dim in full:
                    self.carries(tensor, dim, role="out")

    def reshape(self, source: TensorRef, target: TensorRef) -> None:
        """Couple the axes of a reshape (view, flatten, unflatten, squeeze, unsqueeze).

        Runs of axes whose sizes multiply to the same number are matched: one axis against one
        is an edge, one against several a product definition (flatten C x H x W into C*H*W, or
        split D into heads x head_dim); several against several can't be followed and are fixed.
        """
        src = [d for d in range(source.ndim) if source.shape[d] != 1]
        dst = [d for d in range(target.ndim) if target.shape[d] != 1]
        i = j = 0
        while i < len(src) or j < len(dst):
            if i >= len(src) or j >= len(dst):
                for d in src[i:]:
                    self.fix(source, d)
                for d in dst[j:]:
                    self.fix(target, d)
                return
            run_src, run_dst = [src[i]], [dst[j]]
            prod_src, prod_dst = source.shape[src[i]], target.shape[dst[j]]
            i += 1
            j += 1
            while prod_src != prod_dst:
                if prod_src < prod_dst and i < len(src):
                    run_src.append(src[i])
                    prod_src *= source.shape[src[i]]
                    i += 1
                elif prod_dst < prod_src and j < len(dst):
                    run_dst.append(dst[j])
                    prod_dst *= target.shape[dst[j]]
                    j += 1
                else:
                    break
            if prod_src != prod_dst:
                for d in run_src + src[i:]:
                    self.fix(source, d)
                for d in run_dst + dst[j:]:
                    self.fix(target, d)
                return
            if len(run_src) == 1 and len(run_dst) == 1:
                self.same(source, run_src[0], target, run_dst[0])
            elif len(run_src) == 1:
                self.define(source, run_src[0], "product", [self.ax(target, d) for d in run_dst])
            elif len(run_dst) == 1:
                self.define(target, run_dst[0], "product", [self.ax(source, d) for d in run_src])
            else:
                self._refine_reshape(source, run_src, target, run_dst)

    def _refine_reshape(self, source: TensorRef, run_src: list[int], target: TensorRef, run_dst: list[int]) -> None:
        """Several axes reshaped into several others, e.g. ``(N, H*d) -> (N*H, d)``.

        Both sides are split into their common refinement (here ``N, H, d``), each axis declared
        the product of its pieces. Without one (a boundary that does not divide), all are fixed.
        """
        sides = [(source, run_src), (target, run_dst)]
        marks: list[list[int]] = []
        for tensor, run in sides:
            product, side_marks = 1, []
            for d in run:
                product *= tensor.shape[d]
                side_marks.append(product)
            marks.append(side_marks)
        cuts = sorted(set(marks[0]) | set(marks[1]))
        if any(cut % previous for previous, cut in zip([1] + cuts[:-1], cuts)):
            for tensor, run in sides:
                for d in run:
                    self.fix(tensor, d)
            return
        pieces = [self.atom(cut // previous) for previous, cut in zip([1] + cuts[:-1], cuts)]
        for (tensor, run), side_marks in zip(sides, marks):
            start = 0
            for d, end in zip(run, side_marks):
                stop = cuts.index(end) + 1
                self.define(tensor, d, "product", pieces[start:stop])
                start = stop

    def slice(self, source: TensorRef, dim: int, start: int, stop: int, out: TensorRef, out_dim: int) -> None:
        """``out`` along ``out_dim`` is the block ``[start, stop)`` of ``source`` along ``dim``.

        The source axis becomes the concatenation of the part before the block, the block and
        the part after it, each with a permutation of its own (a partial residual
        ``x[:, :c] + y`` then keeps its symmetry instead of fixing the channels).
        """
        size = source.shape[dim % source.ndim]
        parts = [self.atom(start)] if start > 0 else []
        parts.append(self.ax(out, out_dim))
        if stop < size:
            parts.append(self.atom(size - stop))
        self.define(source, dim, "concat", parts)

    def split(self, source: TensorRef, parts: Sequence[TensorRef], dim: int) -> None:
        """``source`` along ``dim`` is the concatenation of ``parts`` (cat, split, chunk)."""
        dim = dim % source.ndim
        self.define(source, dim, "concat", [self.ax(p, dim) for p in parts])
        for part in parts:
            for d in range(source.ndim):
                if d != dim:
                    self.same(source, d, part, d)

    def reduce(self, source: TensorRef, out: TensorRef, dims: Sequence[int] | None, keep_reduced_free: bool = True) -> None:
        """A symmetric reduction over ``dims`` (sum, mean, amax, var, norm, ...).

        The reduced axes need no constraint (the result does not depend on their order) unless
        ``keep_reduced_free`` is False (ops returning positions, such as argmax), which fixes them.
        """
        reduced = set(range(source.ndim)) if dims is None else {d % source.ndim for d in dims}
        keepdim = out.ndim == source.ndim
        out_dim = 0
        for d in range(source.ndim):
            if d in reduced:
                if keep_reduced_free:
                    self.free(source, d)
                else:
                    self.fix(source, d)
                if keepdim:
                    out_dim += 1
                continue
            if out_dim < out.ndim:
                self.same(source, d, out, out_dim)
            out_dim += 1

    def unknown(self, tensors: Sequence[TensorRef]) -> None:
        """Fix every axis of ``tensors`` (an op whose axes are not understood)."""
        for tensor in tensors:
            self.fix(tensor)

    def product_node(self, tensor: TensorRef, dim: int, sizes: Sequence[int]) -> list[Hashable]:
        """Split axis ``dim`` of ``tensor`` into fresh factors of ``sizes`` (row-major); returns them."""
        assert math.prod(sizes) == tensor.shape[dim % tensor.ndim]
        factors = [self.atom(s) for s in sizes]
        self.define(tensor, dim, "product", factors)
        return factors
