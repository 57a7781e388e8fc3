"""The op-rule table: how each operation couples the axes of its inputs, outputs and parameters.

Rules are data. Each canonical op (``"linear"``, ``"conv"``, ``"add"``, ...) has one
:class:`OpRule` object: its name, its positional argument names, the coupling function, and
further facts about the op (whether its output is an activation worth observing, whether its
module form keeps its input's shape). Aliases map every way of writing the op (``torch.add``,
``operator.add``, ``Tensor.add``, ``aten.add``) onto the rule, so both front-ends share it. A
module type maps onto the rule of the op it computes; the rule adapts the module's parameters
and attributes to the op's arguments (``nn.Conv2d`` to ``conv``'s weight, bias and groups).

Register a rule for your own module so it is traced as a leaf and its axes are understood::

    @autoperm.register_module_rule(MyGate)
    def _my_gate(ctx, call):
        x, out = call.input(0), call.out
        ctx.elementwise([x, ctx.state("scale")], out)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autoperm.infer.context import AffineLayout, RuleContext
from autoperm.spec.kinds import PERMUTATION_ONLY, closure
from autoperm.trace.graph import OpCall, TensorRef, tensors_in

__all__ = [
    "BoundCall",
    "OpRule",
    "Coupling",
    "ModuleArguments",
    "library_aliases",
    "define_rule",
    "op_rule",
    "register_op_rule",
    "register_alias",
    "register_module_rule",
    "has_module_rule",
    "module_rule_for",
    "module_meta_output",
    "bind",
]

Coupling = Callable[["RuleContext", "BoundCall"], None]
ModuleArguments = Callable[["RuleContext", "BoundCall"], dict[str, Any]]


@dataclass
class BoundCall:
    """An :class:`OpCall` with its arguments named, as rules see it."""

    call: OpCall
    op: str
    args: dict[str, Any]
    varargs: list[Any] = field(default_factory=list)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        """Argument ``name``; when the call leaves it out or passes None, the op's own default, else ``default``."""
        value = self.args.get(name)
        return self.defaults.get(name, default) if value is None else value

    def tensor(self, name: str) -> TensorRef | None:
        value = self.args.get(name)
        return value if isinstance(value, TensorRef) else None

    def dims(self, name: str, ndim: int, default: Any = None, spread: bool = False) -> list[int] | None:
        """Argument ``name`` as dims in ``range(ndim)``; ``None`` when it is not given.

        The argument is an int or a list or tuple of ints; with ``spread`` (``*dims`` signatures
        such as ``x.permute(0, 2, 1)`` or ``x.flip(2, 3)``) the positional arguments after it
        are dims too.
        """
        value = self.get(name, default)
        if value is None:
            return None
        items = list(value) if isinstance(value, (list, tuple)) else [value, *(self.varargs if spread else ())]
        if len(items) == 1 and isinstance(items[0], (list, tuple)):
            items = list(items[0])
        return [int(d) % ndim for d in items] if ndim else [int(d) for d in items]

    def dim(self, name: str, ndim: int, default: int = 0) -> int:
        """Argument ``name`` as one dim in ``range(ndim)`` (``default`` when it is not given)."""
        return int(self.get(name, default)) % ndim

    def input(self, index: int = 0) -> TensorRef | None:
        """The ``index``-th positional argument if it is a tensor (module calls, unary ops)."""
        values = list(self.call.args)
        if index < len(values) and isinstance(values[index], TensorRef):
            return values[index]
        return None

    @property
    def out(self) -> TensorRef | None:
        outputs = self.call.output_tensors()
        return outputs[0] if outputs else None

    @property
    def outputs(self) -> list[TensorRef | None]:
        return self.call.outputs

    def tensors(self) -> list[TensorRef]:
        return tensors_in([self.args, self.varargs])

    @property
    def module(self) -> Any:
        return self.call.module

    @property
    def module_name(self) -> str | None:
        return self.call.module_name


@dataclass(frozen=True, eq=False)
class OpRule:
    """Everything autoperm knows about one canonical op.

    Attributes:
        name: the canonical name (``"linear"``); also ``BoundCall.op`` of its functional calls.
        couple: ``couple(ctx, call)`` states how the call's tensor axes couple.
        args: names of the positional arguments, shared by the aliases.
        family: ops that share one coupling share a family (``view`` and ``flatten`` are ``"reshape"``).
        defaults: values of arguments the call leaves out (``diff`` works along the last axis).
        activation: its outputs are preferred activation sites (activation functions).
        module_arguments: for the module form, the op's arguments read from the module instance
            (its state tensors and attributes); ``None`` hands the module call over unchanged.
        meta_output: for the module form, ``meta_output(module, x)`` is its meta output on meta
            input ``x`` without running it (stock layers only: running meta BatchNorm costs half
            a millisecond, meta LSTM seconds); ``None`` runs it.
        affine: ``affine(call)`` describes the per-channel affine on the call's output (the
            weight and bias REPAIR folds a correction into), or ``None`` when this call has none.
        kinds: the symmetry kinds (:mod:`autoperm.spec.kinds`) the op preserves on the axes its
            rule marks with :meth:`RuleContext.carries`; every other axis the call touches admits
            permutations only. Closed downwards (``{"invertible"}`` holds every kind).
        folded_kinds: for a norm with a gain, the kinds it preserves on the axes it normalises
            once its gain and bias are folded into the linear layers reading it (see
            :mod:`autoperm.infer.folds`); ``None`` for every other op.
        folded_fixes_ones: whether those maps must also fix the all-ones vector (LayerNorm's
            mean subtraction).
    """

    name: str
    couple: Coupling
    args: tuple[str, ...] = ()
    family: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    activation: bool = False
    module_arguments: ModuleArguments | None = None
    meta_output: Callable[[nn.Module, torch.Tensor], Any] | None = None
    affine: Callable[[BoundCall], AffineLayout | None] | None = None
    kinds: frozenset[str] = PERMUTATION_ONLY
    folded_kinds: frozenset[str] | None = None
    folded_fixes_ones: bool = False

    def functional(self, ctx: RuleContext, call: BoundCall) -> BoundCall:
        """``call`` with a module call's arguments read from the module, as the op's functional form."""
        if call.module is not None and self.module_arguments is not None:
            return dataclasses.replace(call, args=self.module_arguments(ctx, call), varargs=[], defaults=self.defaults)
        return call

    def __call__(self, ctx: RuleContext, call: BoundCall) -> None:
        self.couple(ctx, self.functional(ctx, call))


_OP_RULES: dict[str, OpRule] = {}
_ALIASES: dict[Any, tuple[str, tuple[str, ...]]] = {}
_MODULE_RULES: dict[type, OpRule] = {}

_DUNDER = {"add": "__add__", "sub": "__sub__", "mul": "__mul__", "div": "__truediv__", "bitwise_and": "__and__",
           "bitwise_or": "__or__", "bitwise_xor": "__xor__", "rsub": "__rsub__", "eq": "__eq__", "ne": "__ne__",
           "lt": "__lt__", "le": "__le__", "gt": "__gt__", "ge": "__ge__", "pow": "__pow__", "remainder": "__mod__",
           "floor_divide": "__floordiv__", "neg": "__neg__", "bitwise_not": "__invert__"}


def library_aliases(name: str, operators: Iterable[Any] = ()) -> list[Any]:
    """Every way of writing op ``name``: ``torch.<name>``, ``F.<name>``, ``torch.special.<name>``,
    ``Tensor.<name>``, the ``operators`` given (``operator.add``), its dunder methods
    (``__add__``, ``__iadd__``), ``"aten.<name>"`` and ``"method:<name>"``."""
    found: list[Any] = []
    for namespace in (torch, F, torch.special, torch.Tensor):
        function = getattr(namespace, name, None)
        if callable(function) and function not in found:
            found.append(function)
    found.extend(operators)
    dunder = _DUNDER.get(name)
    if dunder:
        found.extend([f"aten.{dunder}", f"method:{dunder}", f"aten.{dunder.replace('__', '__i', 1)}"])
    return [*found, f"aten.{name}", f"method:{name}"]


def define_rule(name: str, *, aliases: Iterable[Any] = (), args: Iterable[str] = (),
                module_types: Iterable[type[nn.Module]] = (), **facts: Any) -> Callable[[Coupling], Coupling]:
    """Decorator: the :class:`OpRule` named ``name`` couples with the decorated function.

    The rule is found under its name, ``"aten.<name>"``, ``"method:<name>"``, ``aliases`` (an
    alias already taken keeps its first rule) and ``module_types``; ``facts`` are its other
    fields (``family``, ``defaults``, ``activation``, ``module_arguments``, ``meta_output``,
    ``affine``, ``kinds``, ``folded_kinds``, ``folded_fixes_ones``).
    """
    for fact in ("kinds", "folded_kinds"):
        if fact in facts:
            facts = {**facts, fact: closure(facts[fact])}

    def decorator(couple: Coupling) -> Coupling:
        rule = _OP_RULES[name] = OpRule(name, couple, tuple(args), **{"family": name, **facts})
        for key in (name, f"aten.{name}", f"method:{name}", *aliases):
            _ALIASES.setdefault(key, (name, rule.args))
        _MODULE_RULES.update(dict.fromkeys(module_types, rule))
        return couple

    return decorator


def op_rule(name: str) -> OpRule:
    """The rule of canonical op ``name``."""
    return _OP_RULES[name]


def register_op_rule(name: str, *, aliases: Iterable[Any] = (), args: Iterable[str] = ()) -> Callable[[Coupling], Coupling]:
    """Register ``rule`` as the rule of canonical op ``name`` (decorator).

    Args:
        name: canonical op name; also becomes an alias as ``"aten.<name>"`` and ``"method:<name>"``.
        aliases: other keys (callables such as ``torch.add``, strings ``"method:add"``,
            ``"aten.add"``) that mean this op.
        args: names of the positional arguments, shared by the aliases.

    Returns:
        A decorator that registers the coupling function and returns it unchanged.
    """
    return define_rule(name, aliases=aliases, args=args)


def register_alias(key: Any, name: str, args: Iterable[str] | None = None) -> None:
    """Make ``key`` (a callable or string) another way of writing canonical op ``name``.

    Raises:
        KeyError: there is no op rule named ``name``.
    """
    if name not in _OP_RULES:
        raise KeyError(f"no op rule named {name!r}")
    _ALIASES[key] = (name, tuple(args) if args is not None else _ALIASES[name][1])


def register_module_rule(module_type: type[nn.Module], rule: Coupling | OpRule | None = None) -> Any:
    """Register the rule for a module type; modules with a rule are kept whole when tracing.

    Use as ``register_module_rule(MyModule, rule)`` or as a decorator
    ``@register_module_rule(MyModule)``. Inside the rule, ``call.module`` is the instance,
    ``ctx.state("weight")`` its state tensors, ``call.input(i)`` its inputs and ``call.out``
    its output.

    Returns:
        ``rule`` (or, without it, a decorator that registers the function and returns it).
    """
    if rule is None:
        def decorator(function: Coupling) -> Coupling:
            register_module_rule(module_type, function)
            return function

        return decorator
    _MODULE_RULES[module_type] = rule if isinstance(rule, OpRule) else OpRule(module_type.__name__, rule)
    return rule


def module_rule_for(module: nn.Module) -> OpRule | None:
    """The rule of the nearest registered class in ``type(module)``'s MRO.

    A subclass that overrides ``forward`` computes something else (torchvision's LayerNorm2d
    permutes around the norm), so it does not inherit the rule: it is traced through instead.
    """
    for cls in type(module).__mro__:
        rule = _MODULE_RULES.get(cls)
        if rule is not None:
            return rule if getattr(type(module), "forward", None) is getattr(cls, "forward", None) else None
    return None


def has_module_rule(module: nn.Module) -> bool:
    """Whether ``module`` has a module rule (and so is a leaf for torch.fx)."""
    return module_rule_for(module) is not None


def module_meta_output(module: nn.Module, x: torch.Tensor) -> Any:
    """The meta output of leaf ``module`` on meta input ``x`` known without running it, else ``None``."""
    rule = module_rule_for(module)
    return rule.meta_output(module, x) if rule is not None and rule.meta_output is not None else None


def bind(call: OpCall) -> tuple[BoundCall, OpRule | None]:
    """Name the arguments of ``call`` and find its rule (``None`` when the op is unknown)."""
    if call.module is not None:
        rule = module_rule_for(call.module)
        return BoundCall(call, type(call.module).__name__, {}, list(call.args)), rule
    try:
        entry = _ALIASES.get(call.key)
    except TypeError:  # unhashable target
        entry = None
    if entry is None:  # functions of other libraries are registered by qualified name
        entry = _ALIASES.get(call.target)
    if entry is None:
        return BoundCall(call, call.target, {}, list(call.args)), None
    name, arg_names = entry
    rule = _OP_RULES[name]
    if call.arg_names is not None:
        arg_names = call.arg_names
    args: dict[str, Any] = {}
    positional = list(call.args)
    for arg_name, value in zip(arg_names, positional):
        args[arg_name] = value
    varargs = positional[len(arg_names):]
    for key, value in call.kwargs.items():
        args["input" if key == "self" else key] = value
    return BoundCall(call, name, args, varargs, rule.defaults), rule
