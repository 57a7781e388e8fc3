"""The permutation spec: plain, frozen pydantic data shared by inference and every solver.

A :class:`PermutationSpec` lists :class:`PermutationGroup` s. Each group is one permutation of
``size`` indices; its :class:`Member` s say where those indices live in the state dict. A member
maps group index ``i`` onto the positions

    offset + sum_k o_k * stride_k + i * inner + s      for s < inner, o_k < count_k

of axis ``axis`` of parameter ``param``, where ``outer`` lists the ``(count_k, stride_k)`` pairs.
A plain member has the defaults (offset 0, inner 1, no outer loops); a conv channel flattened
over S positions has ``inner = S``; one part of a concatenation has an ``offset``.

A group with ``per`` set is *fibred* over another group (within-head dims over heads): it holds
one permutation for each index of group ``per``, and the first outer loop of each member runs
over that group's index. A member may instead say along which *other* axis of its tensor the
``per`` group's units run (``per_axis``: stacked experts ``(experts, hidden, d)`` whose hidden
units each expert permutes on its own): the slice at position ``e`` of that axis moves along
``axis`` by row ``e``. Either way, row ``e`` belongs to unit ``e`` *after* group ``per`` has
moved. Convention everywhere: applying ``p`` along an axis means ``new[i] = old[p[i]]``.

A group's ``kind`` (see :mod:`autoperm.spec.kinds`) says which transforms beyond permutations
it admits; groups of kind ``scale`` and ``invertible`` give each member a ``role`` (``"out"``:
the axis writes the group's activation; ``"in"``: it reads it). ``fixes_ones`` limits a group's
transforms to those that map the all-ones vector onto itself (a LayerNorm without gain).

``norm_folds`` lists the norm gains (LayerNorm, RMSNorm) that only linear layers read and the
LayerScale gains on one linear layer's output, and a group's ``folded`` the kind it admits once
they are folded into those layers (see
:func:`autoperm.spec.canonicalize`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from autoperm.errors import SpecError
from autoperm.io.atomic import write_text_atomic
from autoperm.spec.kinds import ROLE_FREE, Kind, Role

__all__ = [
    "FoldedKind",
    "NormFold",
    "Reader",
    "Layout",
    "Member",
    "ActivationSite",
    "AffineSite",
    "Completeness",
    "FixedAxis",
    "PermutationGroup",
    "PermutationSpec",
]

SPEC_VERSION = 1


class Layout(BaseModel):
    """How the indices of a group map onto the positions of one tensor axis."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    axis: int
    offset: int = 0
    inner: int = 1
    outer: tuple[tuple[int, int], ...] = ()

    @field_validator("offset")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    @field_validator("inner")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    def extent(self, size: int) -> int:
        """One past the largest axis position this layout touches for a group of ``size``."""
        last = self.offset + (size - 1) * self.inner + self.inner - 1
        last += sum((count - 1) * stride for count, stride in self.outer)
        return last + 1

    @property
    def is_plain(self) -> bool:
        return self.offset == 0 and self.inner == 1 and not self.outer


class Member(Layout):
    """One state-dict tensor axis (or part of one) that a group permutes.

    ``role`` is ``"out"`` for an axis that writes the group's activation (moves by ``T``) and
    ``"in"`` for one that reads it (moves by ``T^-T``); only groups of kind ``scale`` and
    ``invertible`` need it.

    ``per_axis`` (members of fibred groups only): the axis of ``param`` along which the units of
    the group's ``per`` group run, when that is not ``axis`` (stacked experts: their hidden units
    on ``axis``, the experts on ``per_axis``); its length is the ``per`` group's size, and the
    layout then describes the positions inside one unit's slice. ``None``: the ``per`` group's
    units are the first outer loop of the layout along ``axis``.
    """

    param: str
    role: Role | None = None
    per_axis: int | None = None

    @field_validator("per_axis")
    @classmethod
    def _per_axis_non_negative(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError("must be >= 0")
        return value


class ActivationSite(Layout):
    """An activation of the traced graph on which a group's axis is observable."""

    node: str


class AffineSite(BaseModel):
    """A layer call with a per-channel affine on its output, whose output channels a group moves.

    REPAIR (Jordan et al., arXiv 2211.08403) renormalises these channels and folds the correction
    into ``weight`` (and ``bias``). Which groups move a site's channels follows from the groups'
    members on ``weight`` along ``weight_axis``.

    Attributes:
        node: the traced-graph node of the call (its output is the channels' activation).
        module: the module's qualified name for a module call, ``None`` for a functional one.
        kind: the op or module class (``"Conv2d"``, ``"linear"``, ``"addmm"``, ``"layer_norm"``).
        channel_axis: the axis of the node's output that holds the channels.
        weight: state-dict name of the tensor scaled per channel.
        weight_axis: the axis of ``weight`` that runs over the output channels.
        bias: state-dict name of the per-channel shift; ``None`` means a scale-only correction.
        norm: whether the layer is a normalisation layer.
        feeds: the norm sites that alone read this call's output (a conv feeding its BatchNorm);
            REPAIR corrects those norms instead.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    module: str | None = None
    kind: str
    channel_axis: int
    weight: str
    weight_axis: int
    bias: str | None = None
    norm: bool = False
    feeds: tuple[str, ...] = ()


class FoldedKind(BaseModel):
    """The kind a group admits once every foldable norm gain (``PermutationSpec.norm_folds``) is folded.

    Attributes:
        kind: the largest kind then (LayerNorm and RMSNorm without gain keep orthogonal maps).
        fixes_ones: the transforms must also fix the all-ones vector (LayerNorm's mean subtraction).
        kind_limited_by: the op that kept the group from the next larger kind.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    fixes_ones: bool = False
    kind_limited_by: str | None = None


class Reader(BaseModel):
    """A linear layer that reads a norm's output: ``out = contract(weight, x along axis) + bias``.

    Attributes:
        weight: state-dict name of the weight; used by no other call.
        axis: the axis of ``weight`` contracted against the norm's features (1 for ``nn.Linear``,
            0 for an ``(in, out)`` weight as in Hugging Face's ``Conv1D``).
        bias: state-dict name of the layer's bias, ``None`` when it has none.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: str
    axis: int
    bias: str | None = None


class NormFold(BaseModel):
    """A gain that can be folded into the linear layers next to it, so that it becomes 1.

    A LayerNorm or RMSNorm over the last axis computes ``gain * n(x) + bias``; when only linear
    layers read it, ``W (gain * n + bias) + b = (W diag(gain)) n + (b + W bias)``, so the gain
    becomes 1 and the bias 0 without changing the function (see :func:`autoperm.spec.canonicalize`).
    A LayerScale (``op: layer_scale``) computes ``gain * (W x + b)`` with the output of one linear
    layer that nothing else reads: ``(diag(gain) W) x + gain * b``, so its gain moves into the rows
    of that layer (``writers``) instead.

    Attributes:
        node: the traced-graph node of the norm or product (for messages).
        op: ``"layer_norm"``, ``"rms_norm"`` or ``"layer_scale"``.
        gain: state-dict name of the gain (1-D, used by no other call).
        bias: state-dict name of the norm's bias, ``None`` when it has none (always for a LayerScale).
        readers: the linear layers that read the norm's output (directly, or through reshapes,
            token selection and means over tokens); none for a LayerScale.
        writers: the linear layer whose output a LayerScale multiplies (``axis`` 0: its rows); none
            for a norm.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    op: Literal["layer_norm", "rms_norm", "layer_scale"]
    gain: str
    bias: str | None = None
    readers: tuple[Reader, ...] = ()
    writers: tuple[Reader, ...] = ()

    @property
    def folds_bias(self) -> bool:
        """Whether the norm's bias folds into the readers' biases (it has one, and so does every reader)."""
        return self.bias is not None and bool(self.readers) and all(reader.bias is not None for reader in self.readers)


class PermutationGroup(BaseModel):
    """One permutation of ``size`` indices shared by all its members.

    Attributes:
        kind: the largest kind of transform the group admits (``"permutation"``, ``"scale"``,
            ``"orthogonal"`` or ``"invertible"``; see :mod:`autoperm.spec.kinds`). Every kind
            contains the permutations, so permutation solvers work on every group.
        kind_limited_by: the op that kept the group from the next larger kind (recorded by
            inference for groups of kind ``scale`` and ``orthogonal``).
        fixes_ones: every transform of the group must map the all-ones vector onto itself
            (``T 1 = 1``): a LayerNorm with gain 1 and bias 0 keeps exactly the orthogonal maps
            that do. Permutations always do.
        folded: the kind once the spec's ``norm_folds`` are folded, where that differs (``None``:
            the same as ``kind``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    size: int
    members: tuple[Member, ...]
    fixed: bool = False
    per: str | None = None
    kind: Kind = "permutation"
    kind_limited_by: str | None = None
    fixes_ones: bool = False
    folded: FoldedKind | None = None
    activations: tuple[ActivationSite, ...] = ()

    @field_validator("size")
    @classmethod
    def _size_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    @property
    def active(self) -> bool:
        """Whether the group actually permutes anything (not fixed, more than one index)."""
        return not self.fixed and self.size > 1


class FixedAxis(BaseModel):
    """A hidden layer's output axis (weight rows of a conv / linear) that is not fully permutable.

    Attributes:
        param: the state-dict weight whose output units these are.
        axis: its output axis.
        size: the number of units on that axis.
        permutable: how many of them some active group moves.
        reason: why the others stay fixed: the op (graph node and module) that fixed them, and
            how (``model output``, ``unsupported op at node ...``, ``node ... keeps it fixed``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    param: str
    axis: int
    size: int
    permutable: int = 0
    reason: str


class Completeness(BaseModel):
    """How much of a model's hidden width the spec can permute (see ``PermutationSpec.completeness``)."""

    model_config = ConfigDict(frozen=True)

    hidden_units: int
    permutable_units: int
    output_units: int
    fixed: tuple[FixedAxis, ...]

    @property
    def share(self) -> float:
        """Permutable hidden units / hidden units (1.0 when there are none)."""
        return self.permutable_units / self.hidden_units if self.hidden_units else 1.0


class PermutationSpec(BaseModel):
    """All permutation groups of a model, and the shapes of its state dict.

    ``hidden_units`` counts the output units of every conv / linear weight that are not model
    outputs, ``kept_fixed`` lists the hidden axes some of whose units no group moves, with the
    reason (filled in by :func:`autoperm.infer_spec`; empty for hand-written specs).

    The spec is the one contract between inference and everything after it: besides the groups
    it records what later stages need from the traced graph, so that none of them looks at the
    graph again: each group's ``activations`` (activation matching), ``affine_sites`` (REPAIR;
    ``None`` when not recorded, as in hand-written specs) and ``leaf_modules``, the modules
    beyond torch's own layers that the trace kept whole (so the graph that records activations
    has the node names the spec uses).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = SPEC_VERSION
    model: str | None = None
    tracer: Literal["fx", "export"] = "fx"
    leaf_modules: tuple[str, ...] = ()
    groups: tuple[PermutationGroup, ...]
    affine_sites: tuple[AffineSite, ...] | None = None
    norm_folds: tuple[NormFold, ...] = ()
    hidden_units: int | None = None
    kept_fixed: tuple[FixedAxis, ...] = ()
    shapes: dict[str, tuple[int, ...]] = {}

    @model_validator(mode="after")
    def _check_consistency(self) -> PermutationSpec:
        names: set[str] = set()
        for index, group in enumerate(self.groups):
            where = f"groups[{index}] ({group.name!r})"
            if group.name in names:
                raise ValueError(f"{where}: duplicate group name")
            names.add(group.name)
            for m_index, member in enumerate(group.members):
                member_where = f"{where}.members[{m_index}] ({member.param!r})"
                if group.kind not in ROLE_FREE and member.role is None:
                    raise ValueError(f"{member_where}: a group of kind {group.kind!r} needs a role ('in' or 'out') on every member")
                shape = self.shapes.get(member.param)
                if self.shapes and shape is None:
                    raise ValueError(f"{member_where}: parameter not listed in 'shapes'")
                if shape is None:
                    continue
                if not 0 <= member.axis < len(shape):
                    raise ValueError(
                        f"{member_where}: axis {member.axis} out of range for shape {list(shape)}"
                    )
                if member.extent(group.size) > shape[member.axis]:
                    raise ValueError(
                        f"{member_where}: layout reaches position {member.extent(group.size) - 1}"
                        f" but axis {member.axis} has size {shape[member.axis]}"
                    )
        for index, site in enumerate(self.affine_sites or ()):
            for field, name in (("weight", site.weight), ("bias", site.bias)):
                if name is not None and self.shapes and name not in self.shapes:
                    raise ValueError(f"affine_sites[{index}] ({site.node!r}).{field}: parameter {name!r} not listed in 'shapes'")
            shape = self.shapes.get(site.weight)
            if shape is not None and not 0 <= site.weight_axis < len(shape):
                raise ValueError(f"affine_sites[{index}] ({site.node!r}).weight_axis: {site.weight_axis} out of range for shape {list(shape)}")
        for index, fold in enumerate(self.norm_folds):
            self._check_fold(index, fold)
        for index, group in enumerate(self.groups):
            if group.per is None:
                continue
            if group.per not in names or group.per == group.name:
                raise ValueError(f"groups[{index}] ({group.name!r}).per: unknown group {group.per!r}")
            parent = next(g for g in self.groups if g.name == group.per)
            for member in group.members:
                if member.per_axis is not None:
                    self._check_per_axis(index, group, parent, member)
                elif not member.outer or member.outer[0][0] != parent.size:
                    raise ValueError(
                        f"groups[{index}] ({group.name!r}): member {member.param!r} must have a first"
                        f" outer loop of count {parent.size} (the size of group {group.per!r})"
                    )
        for index, group in enumerate(self.groups):
            stray = next((m for m in group.members if m.per_axis is not None), None)
            if group.per is None and stray is not None:
                raise ValueError(f"groups[{index}] ({group.name!r}): member {stray.param!r} has a per_axis, "
                                 "which only members of a fibred group (one with 'per') may have")
        return self

    def _check_per_axis(self, index: int, group: PermutationGroup, parent: PermutationGroup, member: Member) -> None:
        """A member whose ``per`` units run along another axis: that axis exists, differs from
        ``axis``, is as long as the ``per`` group, and the ``per`` group's members on the same
        tensor move it as whole units."""
        where = f"groups[{index}] ({group.name!r}): member {member.param!r}"
        assert member.per_axis is not None
        if member.per_axis == member.axis:
            raise ValueError(f"{where}: per_axis {member.per_axis} is its own axis; leave per_axis out and give "
                             f"the layout a first outer loop over group {parent.name!r} instead")
        shape = self.shapes.get(member.param)
        if shape is not None:
            if member.per_axis >= len(shape):
                raise ValueError(f"{where}: per_axis {member.per_axis} out of range for shape {list(shape)}")
            if shape[member.per_axis] != parent.size:
                raise ValueError(f"{where}: per_axis {member.per_axis} has length {shape[member.per_axis]}, but group "
                                 f"{parent.name!r} (its 'per') has size {parent.size}")
        for other in parent.members:
            if other.param == member.param and other.axis == member.per_axis and not other.is_plain:
                raise ValueError(f"{where}: group {parent.name!r} moves part of per_axis {member.per_axis} "
                                 "(a layout with offset, inner or outer loops); per_axis needs whole units")
            if other.param == member.param and other.axis == member.axis:
                raise ValueError(f"{where}: group {parent.name!r} also moves axis {member.axis}; "
                                 "per_axis needs the units on another axis")

    def _check_fold(self, index: int, fold: NormFold) -> None:
        """Every parameter of a fold is listed in ``shapes`` and each reader's axis matches the gain."""
        where = f"norm_folds[{index}] ({fold.node!r})"
        if fold.op == "layer_scale" and (len(fold.writers) != 1 or fold.readers or fold.bias is not None):
            raise ValueError(f"{where}: a layer_scale fold needs exactly one writer, and no readers or bias")
        if fold.op != "layer_scale" and (not fold.readers or fold.writers):
            raise ValueError(f"{where}: a norm fold needs at least one reader, and no writers")
        if not self.shapes:
            return
        names = [("gain", fold.gain), ("bias", fold.bias)]
        names += [(f"{kind}[{i}].{field}", name) for kind, layers in (("readers", fold.readers), ("writers", fold.writers))
                  for i, r in enumerate(layers) for field, name in (("weight", r.weight), ("bias", r.bias))]
        for field, name in names:
            if name is not None and name not in self.shapes:
                raise ValueError(f"{where}.{field}: parameter {name!r} not listed in 'shapes'")
        gain = self.shapes[fold.gain]
        if len(gain) != 1:
            raise ValueError(f"{where}.gain: {fold.gain!r} has shape {list(gain)}; a foldable gain is a vector")
        for kind, layers in (("readers", fold.readers), ("writers", fold.writers)):
            for i, reader in enumerate(layers):
                shape = self.shapes[reader.weight]
                if len(shape) != 2 or not 0 <= reader.axis < 2 or shape[reader.axis] != gain[0]:
                    raise ValueError(f"{where}.{kind}[{i}]: axis {reader.axis} of {reader.weight!r} (shape {list(shape)}) "
                                     f"does not run over the {gain[0]} features of {fold.gain!r}")

    def completeness(self) -> Completeness:
        """Permutable share of the hidden units, and every fixed hidden axis with its reason.

        Raises:
            SpecError: the spec does not record hidden units (written by hand, or by an older
                version): regenerate it with ``autoperm spec``.
        """
        if self.hidden_units is None:
            raise SpecError("this spec records no completeness report; regenerate it with `autoperm spec`")
        hidden = [f for f in self.kept_fixed if f.reason != "model output"]
        outputs = sum(f.size for f in self.kept_fixed if f.reason == "model output")
        missing = sum(f.size - f.permutable for f in hidden)
        return Completeness(
            hidden_units=self.hidden_units,
            permutable_units=self.hidden_units - missing,
            output_units=outputs,
            fixed=tuple(hidden),
        )

    # ----------------------------------------------------------------- lookups
    @cached_property
    def group_by_name(self) -> dict[str, PermutationGroup]:
        """Group name -> group."""
        return {group.name: group for group in self.groups}

    @cached_property
    def members_by_param(self) -> dict[str, tuple[tuple[PermutationGroup, Member], ...]]:
        """Parameter name -> the (group, member) pairs that touch it, in spec order.

        Only active groups are listed; groups a ``per`` group is fibred over come first, so
        applying the pairs in order composes fibred permutations correctly.
        """
        result: dict[str, list[tuple[PermutationGroup, Member]]] = {}
        ordered = [g for g in self.groups if g.per is None] + [g for g in self.groups if g.per]
        for group in ordered:
            if not group.active:
                continue
            for member in group.members:
                result.setdefault(member.param, []).append((group, member))
        return {name: tuple(pairs) for name, pairs in result.items()}

    @property
    def active_groups(self) -> tuple[PermutationGroup, ...]:
        """The groups that permute something (not fixed, size > 1)."""
        return tuple(group for group in self.groups if group.active)

    def with_fixed(self, names: Iterable[str]) -> PermutationSpec:
        """This spec with the groups ``names`` fixed (solvers then move only the others).

        Example:
            >>> only_heads = spec.with_fixed(g.name for g in spec.groups if g.name != "blocks.0.attn.heads")
        """
        fixing = set(names)
        groups = tuple(group.model_copy(update={"fixed": True}) if group.name in fixing else group for group in self.groups)
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**fields, "groups": groups})

    def __getitem__(self, name: str) -> PermutationGroup:
        try:
            return self.group_by_name[name]
        except KeyError:
            raise SpecError(f"no permutation group named {name!r} in the spec") from None

    # -------------------------------------------------------------- validation
    def check_state_dict(self, state_dict: Mapping[str, Any], what: str = "state dict") -> None:
        """Raise :class:`SpecError` unless ``state_dict`` has every name and shape of the spec.

        Args:
            state_dict: mapping of names to tensors (a model's ``state_dict()``).
            what: how to call the state dict in the message (a file name, say).

        Raises:
            SpecError: listing the first few missing, unexpected or mis-shaped entries.
        """
        problems: list[str] = []
        expected = self.shapes or {
            m.param: None for g in self.groups for m in g.members  # type: ignore[misc]
        }
        for name, shape in expected.items():
            if name not in state_dict:
                problems.append(f"missing {name!r}")
            elif shape is not None and tuple(state_dict[name].shape) != tuple(shape):
                problems.append(
                    f"{name!r} has shape {list(state_dict[name].shape)}, spec says {list(shape)}"
                )
        if self.shapes:
            extra = [name for name in state_dict if name not in self.shapes]
            problems.extend(f"unexpected {name!r}" for name in extra)
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise SpecError(
                f"the {what} does not match the permutation spec: {shown}{more}. "
                "Regenerate the spec for this model with `autoperm spec`."
            )

    # ---------------------------------------------------------------------- YAML
    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """Dump the spec as YAML (defaults left out, number lists on one line).

        If ``path`` is given the file is written atomically (temporary file, then rename), with the
        mode the umask gives new files.
        """
        dumped = self.model_dump(mode="json", exclude_defaults=True)
        data: dict[str, Any] = {"version": self.version, **dumped}
        if "kept_fixed" in data:
            data["kept_fixed"] = [_name_first(f, "param") for f in data["kept_fixed"]]
        for group in data["groups"]:
            group["members"] = [_name_first(m, "param") for m in group["members"]]
            if "activations" in group:
                group["activations"] = [_name_first(a, "node") for a in group["activations"]]
        for fold in data.get("norm_folds", ()):
            for layers in ("readers", "writers"):
                if layers in fold:
                    fold[layers] = [_name_first(reader, "weight") for reader in fold[layers]]
        if data.get("affine_sites") is not None:
            data["affine_sites"] = [_name_first(site, "node") for site in data["affine_sites"]]
        text = yaml.dump(data, Dumper=_SpecDumper, sort_keys=False, width=100)
        if path is not None:
            write_text_atomic(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> PermutationSpec:
        """Load a spec from a YAML file path (or from YAML text containing a newline).

        Raises:
            SpecError: the file is missing, is not YAML, or a field is invalid (named in the message).
        """
        text, where = _read_source(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise SpecError(f"{where} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise SpecError(f"{where} must hold a mapping with a 'groups' list, got {type(data).__name__}")
        return cls.from_dict(data, where=where)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> PermutationSpec:
        """Validate a plain dict (as loaded from YAML) into a spec, naming the bad field on error."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            lines = []
            for item in error.errors()[:5]:
                field = _field_path(data, item["loc"])
                lines.append(f"  {field}: {item['msg']}")
            raise SpecError(f"invalid permutation spec in {where}:\n" + "\n".join(lines)) from error


def _name_first(item: dict[str, Any], key: str) -> dict[str, Any]:
    return {key: item[key], **{k: v for k, v in item.items() if k != key}}


def _field_path(data: Any, loc: tuple[Any, ...]) -> str:
    """Render a pydantic error location, adding group names so the user can find the field."""
    parts: list[str] = []
    node = data
    for key in loc:
        if isinstance(key, int):
            parts.append(f"[{key}]")
            label = None
            if isinstance(node, list) and key < len(node) and isinstance(node[key], dict):
                label = node[key].get("name") or node[key].get("param")
            if label:
                parts.append(f"({label})")
        else:
            parts.append(("." if parts else "") + str(key))
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(parts) or "<root>"


def _read_source(source: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(source, str) and "\n" in source:
        return source, "YAML text"
    path = Path(source)
    try:
        return path.read_text(), str(path)
    except OSError as error:
        raise SpecError(f"cannot read spec file {str(path)!r}: {error.strerror}") from error


class _SpecDumper(yaml.SafeDumper):
    """Safe dumper that keeps lists of numbers (shapes, outer loops) on one line."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flow = all(isinstance(v, (int, float)) or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow and bool(value))


def _represent_dict(dumper: yaml.SafeDumper, value: dict[str, Any]) -> yaml.Node:
    flow = ("param" in value and "reason" not in value) or ("node" in value and "readers" not in value)
    flow = flow or ("weight" in value and set(value) <= {"weight", "axis", "bias"})
    # one member / activation site / affine site / fold reader per line
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=flow)


_SpecDumper.add_representer(list, _represent_list)
_SpecDumper.add_representer(dict, _represent_dict)
