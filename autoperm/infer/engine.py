"""``infer_spec``: trace a model, run every op's rule over the axis graph, read off the groups."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from autoperm.infer import rules_attention, rules_core, rules_layers, rules_moe  # noqa: F401  (registers the rule table)
from autoperm.infer.affine import affine_sites
from autoperm.infer.axes import Polarity, Resolved
from autoperm.infer.context import RuleContext
from autoperm.infer.folds import find_norm_folds
from autoperm.infer.fused_splits import SYNTHETIC_PREFIX, split_fused_axes
from autoperm.infer.registry import bind, has_module_rule, module_meta_output
from autoperm.spec.apply import layout_positions
from autoperm.spec.kinds import ALL_KINDS, ROLE_FREE, largest
from autoperm.spec.kinds import admitted as admitted_kinds
from autoperm.spec.schema import ActivationSite, FixedAxis, FoldedKind, Layout, Member, PermutationGroup, PermutationSpec
from autoperm.trace import TracedGraph, trace_model
from autoperm.trace.graph import OpCall, TensorRef

__all__ = ["infer_spec", "UnsupportedOpWarning", "build_context"]

logger = logging.getLogger(__name__)


class UnsupportedOpWarning(UserWarning):
    """Some ops were not understood; the axes they touch were kept fixed (the spec stays sound)."""


@dataclass(frozen=True)
class _Placement:
    component: int
    offset: int
    inner: int
    outer: tuple[tuple[int, int], ...]
    polarity: int | None = 0  # 1 where the axis moves dual to its group (M^-T), None where unknown


def build_context(traced: TracedGraph) -> tuple[RuleContext, list[str]]:
    """Run the rule of every op of ``traced``; returns the context and the unsupported op types.

    The context's ``norm_folds`` lists the norms whose gains can be folded into their readers
    (:mod:`autoperm.infer.folds`), and its ``folded_kinds`` the kinds once they are.
    """
    ctx = RuleContext(traced)
    plan = find_norm_folds(traced)
    ctx.norm_folds = plan.folds
    ctx.fold_overrides = plan.overrides
    ctx.fold_descriptions = plan.descriptions
    ctx.axes.reason = "model input"
    for ref in traced.inputs:
        ctx.fix(ref)
    ctx.axes.reason = "constant tensor (neither input nor state)"
    for ref in traced.constants:
        for dim in range(ref.ndim):  # an axis whose slices are all equal is unchanged by any permutation
            if dim not in ref.invariant_axes:
                ctx.fix(ref, dim)
    unknown: dict[str, str] = {}
    for call in traced.calls:
        tensors = call.tensors()
        outputs = call.output_tensors()
        if not tensors and not outputs:
            continue
        bound, rule = bind(call)
        ctx.module_name = call.module_name
        involved = tensors + outputs
        if call.module is not None:
            involved += [ctx.state(name) for name in call.module_state]
        if rule is None:
            unknown.setdefault(call.target, call.describe())
            ctx.axes.reason = f"unsupported op at {call.describe()}"
            ctx.unknown([t for t in involved if t is not None])
            continue
        ctx.touched = set()
        ctx.axes.reason = f"{call.describe()} keeps it fixed"
        ctx.begin_call(rule.kinds)
        try:
            functional = rule.functional(ctx, bound)
            rule.couple(ctx, functional)
            _fix_forgotten(ctx, call, involved)
            ctx.record_kinds(call.describe(), involved, node=call.node)
            layout = rule.affine(functional) if rule.affine is not None else None
            if layout is not None:
                ctx.affine[call.node] = layout
        except Exception as error:  # a rule that cannot handle this use keeps its axes fixed
            logger.warning("rule for %s failed (%s: %s); keeping its axes fixed", call.describe(), type(error).__name__, error)
            unknown.setdefault(call.target, call.describe())
            ctx.axes.reason = f"the rule for {call.describe()} failed ({type(error).__name__})"
            ctx.unknown([t for t in involved if t is not None])
    ctx.module_name = None
    ctx.axes.reason = "model output"
    for ref in traced.outputs:
        ctx.fix(ref)
    return ctx, sorted(unknown)


def _fix_forgotten(ctx: RuleContext, call: OpCall, tensors: list[TensorRef | None]) -> None:
    """Fix every axis of the call's tensors that its rule neither coupled, fixed nor freed.

    A rule that misreads its arguments (an unexpected call signature, a list it did not look
    into) would otherwise leave an axis the op reads unconstrained, and the spec unsound.
    """
    for tensor in tensors:
        if tensor is None:
            continue
        for dim, size in enumerate(tensor.shape):
            if size > 1 and (tensor.id, dim) not in ctx.touched:
                logger.debug("%s: rule left axis %d of %s unspecified; keeping it fixed", call.describe(), dim, tensor.id)
                ctx.axes.fix(ctx.ax(tensor, dim), f"the rule for {call.describe()} does not cover this axis")


def _expand(resolved: Resolved, node: Hashable, offset: int, outer: tuple[tuple[int, int], ...], inner: int,
            sizes: dict[Hashable, int], out: list[_Placement], fixed: bool = False, polarity: Polarity | None = None,
            flip: int = 0) -> None:
    """Placements of the groups along ``node`` (or, with ``fixed``, of its fixed parts).

    ``flip`` says whether ``node``'s values move dual to the tensor axis the expansion started
    from; each placement's ``polarity`` is then its side relative to its group (``None``: unknown).
    """
    polarity = polarity or Polarity()
    component = resolved.component.get(node)
    if component is None:
        return
    side = None if component in polarity.ambiguous else flip ^ polarity.of(node)
    if component in resolved.fixed:
        if fixed and resolved.size[component] > 1:
            out.append(_Placement(component, offset, inner, outer, side))
        return
    definitions = resolved.definitions.get(component)
    if not definitions:
        if resolved.size[component] > 1 and not fixed:
            out.append(_Placement(component, offset, inner, outer, side))
        return
    definition = definitions[0]
    below = flip ^ polarity.of(node) ^ polarity.owner.get(component, 0)
    if definition.kind == "product":
        children = _flat_product(resolved, definition.children, polarity, below)
        child_sizes = [sizes[c] for c, _ in children]
        for index, (child, child_flip) in enumerate(children):
            after = 1
            for s in child_sizes[index + 1:]:
                after *= s
            loops = list(outer)
            for previous in range(index):
                later = 1
                for s in child_sizes[previous + 1:]:
                    later *= s
                loops.append((child_sizes[previous], later * inner))
            _expand(resolved, child, offset, tuple(loops), after * inner, sizes, out, fixed, polarity, child_flip)
    else:
        start = 0
        for child in definition.children:
            _expand(resolved, child, offset + start * inner, outer, inner, sizes, out, fixed, polarity, below)
            start += sizes[child]


def _placements(resolved: Resolved, sizes: dict[Hashable, int], node: Hashable, fixed: bool = False,
                polarity: Polarity | None = None) -> list[_Placement]:
    """Where the groups sit along one tensor axis (empty for fixed or untouched axes); with
    ``fixed``, where its fixed parts of more than one index sit; with ``polarity``, on which side
    of its group each placement is."""
    placements: list[_Placement] = []
    if node in sizes:
        _expand(resolved, node, 0, (), 1, sizes, placements, fixed, polarity)
    return placements


def _flat_product(resolved: Resolved, children: tuple[Hashable, ...], polarity: Polarity,
                  flip: int) -> list[tuple[Hashable, int]]:
    """Children of a product with nested products spliced in, so every factor gets its own loop;
    each with whether its values move dual to the expansion's start."""
    flat: list[tuple[Hashable, int]] = []
    for child in children:
        component = resolved.component[child]
        definitions = resolved.definitions.get(component)
        if definitions and definitions[0].kind == "product":
            below = flip ^ polarity.of(child) ^ polarity.owner.get(component, 0)
            flat.extend(_flat_product(resolved, definitions[0].children, polarity, below))
        else:
            flat.append((child, flip))
    return flat


def _strip(name: str) -> str:
    for suffix in (".weight", "_weight", ".bias", "_bias"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def infer_spec(
    model: nn.Module,
    example_inputs: Any,
    *,
    tracer: Literal["auto", "fx", "export"] = "auto",
    model_name: str | None = None,
) -> PermutationSpec:
    """Infer the permutation groups of ``model`` automatically.

    The model is traced (torch.fx, or torch.export where symbolic tracing fails), every op's
    rule couples tensor axes in a networkx graph, and the components of that graph that touch
    the state dict, are not fixed and have more than one index become permutation groups.

    Args:
        model: any ``nn.Module``; it is not modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        tracer: ``"auto"``, ``"fx"`` or ``"export"``.
        model_name: recorded in the spec (defaults to the class name).

    Returns:
        A :class:`PermutationSpec` with every state-dict shape and the groups.

    Raises:
        TraceError: the model cannot be traced by either front-end.

    Warns:
        UnsupportedOpWarning: listing op types whose axes were kept fixed.

    Example:
        >>> spec = infer_spec(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> [g.name for g in spec.groups][:2]
        ['conv1', 'layer1.0.conv1']
    """
    with rules_moe.traceable_experts(model):
        traced = trace_model(model, example_inputs, is_leaf=has_module_rule, tracer=tracer, meta_output=module_meta_output)
    traced = split_fused_axes(traced)
    ctx, unknown = build_context(traced)
    if unknown:
        message = "kept the axes fixed around ops autoperm does not understand: " + ", ".join(unknown)
        warnings.warn(message, UnsupportedOpWarning, stacklevel=2)
    resolved = ctx.axes.resolve()
    sizes = ctx.axes.sizes

    polarity = ctx.axes.polarity(resolved)
    members: dict[int, list[Member]] = {}
    polarities: dict[int, list[int | None]] = {}  # per member: 1 where it moves dual to its group, None if unknown
    state_ids: dict[str, str] = {}  # state-dict name -> tensor id
    names_of: dict[str, list[str]] = {}
    for alias, target in traced.aliases.items():
        names_of.setdefault(target, []).append(alias)
    for canonical, ref in traced.state.items():
        names = names_of.get(canonical) or [canonical]
        state_ids.update(dict.fromkeys(names, ref.id))
        for dim in range(ref.ndim):
            for placement in _placements(resolved, sizes, (ref.id, dim), polarity=polarity):
                for name in names:
                    members.setdefault(placement.component, []).append(
                        Member.model_construct(param=name, axis=dim, offset=placement.offset, inner=placement.inner, outer=placement.outer)
                    )
                    polarities.setdefault(placement.component, []).append(placement.polarity)

    sites = _activation_sites(traced, resolved, sizes, set(members))
    moved = {(member.param, member.axis) for group_members in members.values() for member in group_members}
    fibres = _fibres(ctx, resolved, sizes, members, traced)
    names = _group_names(ctx.producers, members, fibres)
    along = _fibres_along_labels(ctx, resolved, sizes, members, traced, exclude=set(fibres) | set(fibres.values()))
    for component, (parent, per_axis) in along.items():
        fibres[component] = parent
        members[component] = [m.model_copy(update={"per_axis": per_axis[m.param]}) for m in members[component]]
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    kinds = _group_kinds(ctx, resolved, members, state_ids, polarities)
    folded = _group_kinds(ctx, resolved, members, state_ids, polarities, folded=True) if ctx.norm_folds else {}
    groups = [
        PermutationGroup(
            name=names[component],
            size=resolved.size[component],
            members=tuple(group_members) if kinds[component].roles is None else tuple(
                m.model_copy(update={"role": role}) for m, role in zip(group_members, kinds[component].roles)),
            per=names[fibres[component]] if component in fibres else None,
            kind=kinds[component].kind,
            kind_limited_by=kinds[component].limited_by,
            folded=_folded_kind(kinds[component], folded.get(component)),
            activations=tuple(sites.get(component, ())) if component not in fibres else (),
        )
        for component, group_members in members.items()
    ]
    hidden_units, kept_fixed = _completeness(ctx, traced, resolved, sizes, members)
    logger.info("inferred %d permutation groups (%s front-end)", len(groups), traced.tracer)
    return PermutationSpec(
        model=model_name or type(model).__name__, tracer=traced.tracer, leaf_modules=_leaf_modules(traced),
        groups=tuple(groups), affine_sites=affine_sites(traced, ctx.affine, moved), norm_folds=ctx.norm_folds, hidden_units=hidden_units,
        kept_fixed=kept_fixed, shapes=shapes,
    )


_NEXT_KIND = {"scale": "orthogonal", "orthogonal": "invertible"}
"""For a group of this kind, the kind whose exclusion ``kind_limited_by`` names."""


@dataclass(frozen=True)
class _GroupKind:
    kind: str
    limited_by: str | None
    roles: list[str] | None
    fixes_ones: bool = False


def _group_kinds(ctx: RuleContext, resolved: Resolved, members: dict[int, list[Member]],
                 state_ids: dict[str, str], polarities: dict[int, list[int | None]],
                 folded: bool = False) -> dict[int, _GroupKind]:
    """Each group's kind, the op that kept it from the next larger kind, and its members' roles
    (``None`` for kinds that need none).

    A member's role is the one its rules gave its state axis, swapped where the member sits on
    the dual side of a contraction (a key against its query: ``polarities`` 1); a member whose
    polarity is ambiguous (``None``) has no known role.

    A component admits the kinds every call touching one of its nodes preserves there, and
    those of every component it is a part of (a product or concatenation moves its parts);
    scale and invertible maps also need a single role on every member. With ``folded``, the
    kinds once the foldable norm gains are folded (``ctx.folded_kinds``), whether the maps must
    fix the all-ones vector, and the folded gains and biases left out of the role check.
    """
    kinds_by_node = ctx.folded_kinds if folded else ctx.kinds
    excluded_by = ctx.folded_excluded_by if folded else ctx.excluded_by
    admitted = dict.fromkeys(range(len(resolved.members)), ALL_KINDS)
    excluded: dict[int, dict[str, tuple[float, str]]] = {c: {} for c in admitted}
    ones = {resolved.component[node] for node in ctx.ones_fixed if node in resolved.component} if folded else set()
    for node, kinds in kinds_by_node.items():
        component = resolved.component.get(node)
        if component is None:
            continue
        admitted[component] &= kinds
        for kind, reason in excluded_by.get(node, {}).items():
            if kind not in excluded[component] or reason < excluded[component][kind]:
                excluded[component][kind] = reason
    changed = True
    while changed:  # a composite axis's limits hold for its parts (a part fixing ones keeps the whole fixing it)
        changed = False
        for component, definitions in resolved.definitions.items():
            for definition in definitions:
                for child in {resolved.component[c] for c in definition.children}:
                    narrowed = admitted[child] & admitted[component]
                    if narrowed != admitted[child]:
                        for kind in admitted[child] - narrowed:
                            excluded[child].setdefault(kind, excluded[component].get(kind, (0, "a part of a larger axis")))
                        admitted[child] = narrowed
                        changed = True
                    if component in ones and child not in ones:
                        ones.add(child)
                        changed = True
    folded_params = {name for fold in ctx.norm_folds for name in (fold.gain, fold.bias) if name} if folded else set()
    result: dict[int, _GroupKind] = {}
    for component, group_members in members.items():
        kinds = admitted[component]
        checked = [(m, polarity) for m, polarity in zip(group_members, polarities[component]) if m.param not in folded_params]
        roles = [_polarised(ctx.roles.get((state_ids[m.param], m.axis), set()), polarity) for m, polarity in checked]
        if kinds - ROLE_FREE:
            for (member, polarity), member_roles in zip(checked, roles):
                if len(member_roles) != 1:
                    what = ("an ambiguous polarity (contracted both like and against the activation)" if polarity is None
                            else "no known role" if not member_roles else "both roles (it writes and reads the activation)")
                    for kind in kinds - ROLE_FREE:
                        excluded[component].setdefault(kind, (float("inf"), f"{member.param} axis {member.axis} has {what}"))
                    kinds = kinds & ROLE_FREE
                    break
        kind = largest(kinds)
        reason = excluded[component].get(_NEXT_KIND.get(kind, ""))
        member_roles = [next(iter(r)) for r in roles] if kind not in ROLE_FREE else None
        fixes_ones = component in ones and kind in ("orthogonal", "invertible")
        result[component] = _GroupKind(kind, reason[1] if reason else None, member_roles, fixes_ones)
    return result


def _polarised(roles: set[str], polarity: int | None) -> set[str]:
    """A member's roles seen from its group: swapped on the dual side, none where it is ambiguous."""
    if polarity is None:
        return set()
    return {"in" if role == "out" else "out" for role in roles} if polarity else roles


def _folded_kind(kind: _GroupKind, folded: _GroupKind | None) -> FoldedKind | None:
    """The group's ``folded`` record: ``None`` unless folding the norm gains changes what it admits.

    A folded kind that would need roles the unfolded group lacks is lowered to orthogonal maps
    (the roles are recorded for the unfolded kind only; norms keep at most orthogonal maps anyway).
    """
    if folded is None or (folded.kind, folded.fixes_ones) == (kind.kind, kind.fixes_ones):
        return None
    folded_kind = folded.kind
    if folded_kind not in ROLE_FREE and kind.roles is None:
        folded_kind = largest(admitted_kinds(folded_kind) & ROLE_FREE)
    if folded_kind == kind.kind and not folded.fixes_ones:
        return None
    return FoldedKind(kind=folded_kind, fixes_ones=folded.fixes_ones and folded_kind != "permutation",
                      kind_limited_by=folded.limited_by)


def _leaf_modules(traced: TracedGraph) -> tuple[str, ...]:
    """Modules the trace kept whole beyond torch.fx's own leaves (stock ``torch.nn`` layers)."""
    if traced.tracer != "fx":
        return ()
    stock = torch.fx.Tracer()
    return tuple(sorted({
        call.module_name for call in traced.calls
        if call.module is not None and call.module_name and not stock.is_leaf_module(call.module, call.module_name)
    }))


def _completeness(ctx: RuleContext, traced: TracedGraph, resolved: Resolved, sizes: dict[Hashable, int],
                  members: dict[int, list[Member]]) -> tuple[int, tuple[FixedAxis, ...]]:
    """Hidden units (output units of conv / linear weights that are no model output), and each
    such axis that no group fully covers, with why the rest is fixed."""
    hidden = 0
    report: list[FixedAxis] = []
    for state_name, dim in dict.fromkeys(ctx.producers):
        ref = traced.state.get(state_name)
        if ref is None:
            continue
        size = ref.shape[dim]
        still = torch.zeros(size, dtype=torch.bool)
        for p in _placements(resolved, sizes, (ref.id, dim), fixed=True):
            still[layout_positions(Layout(axis=0, offset=p.offset, inner=p.inner, outer=p.outer), resolved.size[p.component]).flatten()] = True
        covered = size - int(still.sum())
        reasons = _fixed_reasons(resolved, resolved.component.get((ref.id, dim)))
        name = next((n for n, canonical in traced.aliases.items() if canonical == state_name), state_name)
        if "model output" in reasons and covered == 0:
            report.append(FixedAxis(param=name, axis=dim, size=size, reason="model output"))
            continue
        hidden += size
        if covered < size:
            shown = "; ".join(reasons[:2]) + (f" (and {len(reasons) - 2} more)" if len(reasons) > 2 else "")
            report.append(FixedAxis(param=name, axis=dim, size=size, permutable=covered, reason=shown or "kept fixed"))
    return hidden, tuple(report)


def _fixed_reasons(resolved: Resolved, component: int | None) -> list[str]:
    """Why a component (or the fixed parts of a composite one) is fixed, first reasons first."""
    if component is None:
        return []
    if component in resolved.fixed:
        return list(resolved.why_fixed.get(component, ["kept fixed"]))
    found: list[str] = []
    for definition in resolved.definitions.get(component, ()):
        for child in definition.children:
            for reason in _fixed_reasons(resolved, resolved.component.get(child)):
                if reason not in found:
                    found.append(reason)
        break
    return found


def _activation_sites(traced: TracedGraph, resolved: Resolved, sizes: dict[Hashable, int], wanted: set[int]) -> dict[int, list[ActivationSite]]:
    """One observable activation per group, preferring outputs of activation functions."""
    best: dict[int, tuple[int, ActivationSite]] = {}
    for call in traced.calls:
        out = call.outputs[0] if len(call.outputs) == 1 else None
        if out is None or call.node.startswith(SYNTHETIC_PREFIX):
            continue
        rule = bind(call)[1]
        rank = 0 if rule is not None and rule.activation else 1
        for dim in range(out.ndim):
            for placement in _placements(resolved, sizes, (out.id, dim)):
                if placement.component not in wanted:
                    continue
                score = rank * 2 + (0 if placement.offset == 0 and placement.inner == 1 and not placement.outer else 1)
                if placement.component not in best or score < best[placement.component][0]:
                    site = ActivationSite(node=call.node, axis=dim, offset=placement.offset, inner=placement.inner, outer=placement.outer)
                    best[placement.component] = (score, site)
    return {component: [site] for component, (_, site) in best.items()}


def _fibres(ctx: RuleContext, resolved: Resolved, sizes: dict[Hashable, int], members: dict[int, list[Member]],
            traced: TracedGraph) -> dict[int, int]:
    """Groups that may hold one permutation per index of another group (within-head dims).

    Group ``d`` is fibred over group ``h`` when every tensor of the graph that carries ``d``
    also carries ``h`` (so each op acts head by head), no op mixes entries along ``h`` in a
    tensor that carries ``d`` (a softmax over heads), and in every state tensor ``d`` sits
    directly inside ``h`` on the same axis (``h`` its first outer loop).
    """
    by_slot: dict[tuple[str, int, int], set[int]] = {}
    for other, other_members in members.items():
        for m in other_members:
            by_slot.setdefault((m.param, m.axis, m.inner), set()).add(other)
    candidates: dict[int, set[int]] = {}
    for component, group_members in members.items():
        allowed: set[int] | None = None
        for member in group_members:
            if not member.outer:
                allowed = set()
                break
            count, stride = member.outer[0]
            inside = {o for o in by_slot.get((member.param, member.axis, stride), ()) if resolved.size[o] == count}
            allowed = inside if allowed is None else allowed & inside
            if not allowed:
                break
        allowed = (allowed or set()) - {component}
        if allowed:
            candidates[component] = allowed
    if not candidates:
        return {}
    state_ids = {ref.id for ref in traced.state.values()}
    in_tensor: dict[str, set[int]] = {}
    for node in sizes:
        if node[0] == "atom":
            continue
        in_tensor.setdefault(node[0], set()).update(p.component for p in _placements(resolved, sizes, node))
    for tensor_id, components in in_tensor.items():
        if tensor_id in state_ids:
            continue
        for component in components & candidates.keys():
            candidates[component] &= components
    for node in ctx.mixed:
        placements = _placements(resolved, sizes, node)
        for mixed in {p.component for p in placements}:
            for component in in_tensor.get(node[0], ()):
                candidates.get(component, set()).discard(mixed)
    chosen = {d: next(iter(h)) for d, h in candidates.items() if len(h) == 1}
    return {d: h for d, h in chosen.items() if h not in chosen}


def _fibres_along_labels(ctx: RuleContext, resolved: Resolved, sizes: dict[Hashable, int], members: dict[int, list[Member]],
                         traced: TracedGraph, exclude: set[int]) -> dict[int, tuple[int, dict[str, int]]]:
    """Groups that may hold one permutation per index of a group on another axis (each expert's hidden units).

    Stacked experts ``w (experts, hidden, d)`` are read at the router's ``topk`` positions
    (``w[labels]``), so row ``r`` of what is read, and of everything computed from it row by row,
    belongs to expert ``labels[r]`` (:func:`rules_moe.label_rows`). Group ``d`` (the hidden units)
    is fibred over group ``h`` (the experts) along another axis when:

    * in every state tensor that carries ``d``, ``h`` moves a whole other axis (plain), and
      ``d`` sits on no axis ``h`` moves;
    * every other tensor that carries ``d`` has an axis in one component of such rows, read at
      one labels tensor of the ``topk`` over ``h``'s axis; and no op mixes entries along that
      axis in a tensor that carries ``d`` (a sum over tokens' copies).

    Returns:
        ``{d: (h, {state name: the axis of h in it})}``.
    """
    rows = rules_moe.label_rows(ctx)
    if not rows:
        return {}
    row_sources: dict[int, set[tuple[int | None, str]]] = {}
    for (tensor_id, dim), (ranked, labels) in rows.items():
        row = resolved.component.get((tensor_id, dim))
        if row is not None:
            row_sources.setdefault(row, set()).add((resolved.component.get(ranked), labels))
    expert_rows = {row: next(iter(sources))[0] for row, sources in row_sources.items() if len(sources) == 1}
    state_ids = {name: ref.id for name, ref in traced.state.items()}
    for alias, target in traced.aliases.items():
        if target in state_ids:
            state_ids[alias] = state_ids[target]
    shapes = {ref.id: ref.shape for ref in traced.state.values()}
    plain_at: dict[tuple[str, int], int] = {}
    for component, group_members in members.items():
        for m in group_members:
            if m.is_plain and m.param in state_ids and shapes[state_ids[m.param]][m.axis] == resolved.size[component]:
                plain_at[(m.param, m.axis)] = component
    candidates: dict[int, tuple[int, dict[str, int]]] = {}
    for component, group_members in members.items():
        if component in exclude:
            continue
        parents: set[int] = set()
        axes: dict[str, int] = {}
        for m in group_members:
            found = [(axis, plain_at[(m.param, axis)]) for axis in range(len(shapes.get(state_ids.get(m.param, ""), ())))
                     if axis != m.axis and plain_at.get((m.param, axis)) in expert_rows.values()]
            if len(found) != 1 or m.outer or plain_at.get((m.param, m.axis)) == found[0][1]:
                break
            axes[m.param] = found[0][0]
            parents.add(found[0][1])
        else:
            if len(parents) == 1 and (parent := parents.pop()) != component:
                candidates[component] = (parent, axes)
    if not candidates:
        return {}
    by_tensor: dict[str, dict[int, int]] = {}  # tensor id -> {component: axis}
    for node, component in resolved.component.items():
        if node[0] != "atom":
            by_tensor.setdefault(node[0], {})[component] = node[1]
    carried: dict[str, set[int]] = {}
    for node in sizes:
        if node[0] != "atom":
            carried.setdefault(node[0], set()).update(p.component for p in _placements(resolved, sizes, node))
    own_state = set(shapes)
    for tensor_id, components in carried.items():
        if tensor_id in own_state:
            continue
        for component in components & candidates.keys():
            parent = candidates[component][0]
            row_axes = [c for c in by_tensor.get(tensor_id, {}) if expert_rows.get(c) == parent]
            if len(row_axes) != 1 or any(node[0] == tensor_id and resolved.component.get(node) == row_axes[0]
                                         for node in ctx.mixed):
                del candidates[component]
    return candidates


def _group_names(producers: list[tuple[str, int]], members: dict[int, list[Member]], fibres: dict[int, int]) -> dict[int, str]:
    """Readable, stable names: the module that first writes the group, else its first member.

    Groups that others are fibred over get ``.heads``; fibred groups ``.head_dims``.
    """
    at: dict[tuple[str, int], list[int]] = {}
    for component, group_members in members.items():
        for member in group_members:
            at.setdefault((member.param, member.axis), []).append(component)
    base: dict[int, str] = {}
    for state_name, axis in producers:
        for component in at.get((state_name, axis), ()):
            base.setdefault(component, _strip(state_name))
    for component, group_members in members.items():
        base.setdefault(component, _strip(group_members[0].param) + (f".axis{group_members[0].axis}" if group_members[0].axis else ""))
    heads = set(fibres.values())
    for component in base:
        if component in heads:
            base[component] += ".heads"
        elif component in fibres:
            base[component] += ".head_dims"
    names: dict[int, str] = {}
    by_base: dict[str, list[int]] = {}
    for component, name in base.items():
        by_base.setdefault(name, []).append(component)
    for name, components in by_base.items():
        if len(components) == 1:
            names[components[0]] = name
            continue
        for index, component in enumerate(components):
            names[component] = f"{name}.{index}"
    return names
