"""The op-rule table: how each operation couples the axes of its inputs, outputs and parameters.

Rules are data. Each canonical op name (``"linear"``, ``"conv"``, ``"add"``, ...) has one rule;
aliases map every way of writing the op (``torch.add``, ``operator.add``, ``Tensor.add``,
``aten.add``) onto it together with its positional argument names, so both front-ends share
one rule. Module types map to module rules, which usually call the functional rule with the
module's parameters.

Register a rule for your own module so it is traced as a leaf and its axes are understood::

    @autoperm.register_module_rule(MyGate)
    def _my_gate(ctx, call):
        x, out = call.input(0), call.out
        ctx.elementwise([x, ctx.state("scale")], out)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from autoperm.trace.graph import OpCall, TensorRef, tensors_in

if TYPE_CHECKING:
    from autoperm.infer.context import RuleContext

__all__ = [
    "BoundCall",
    "OpRule",
    "ModuleRule",
    "register_op_rule",
    "register_alias",
    "register_module_rule",
    "has_module_rule",
    "module_rule_for",
    "bind",
]

OpRule = Callable[["RuleContext", "BoundCall"], None]
ModuleRule = Callable[["RuleContext", "BoundCall"], None]

_OP_RULES: dict[str, OpRule] = {}
_ALIASES: dict[Any, tuple[str, tuple[str, ...]]] = {}
_MODULE_RULES: dict[type, ModuleRule] = {}


@dataclass
class BoundCall:
    """An :class:`OpCall` with its arguments named, as rules see it."""

    call: OpCall
    op: str
    args: dict[str, Any]
    varargs: list[Any] = field(default_factory=list)

    def get(self, name: str, default: Any = None) -> Any:
        value = self.args.get(name)
        return default if value is None else value

    def tensor(self, name: str) -> TensorRef | None:
        value = self.args.get(name)
        return value if isinstance(value, TensorRef) else None

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


def register_op_rule(name: str, *, aliases: Iterable[Any] = (), args: Iterable[str] = ()) -> Callable[[OpRule], OpRule]:
    """Register ``rule`` as the rule of canonical op ``name`` (decorator).

    Args:
        name: canonical op name; also becomes an alias as ``"aten.<name>"`` and ``"method:<name>"``.
        aliases: other keys (callables such as ``torch.add``, strings ``"method:add"``,
            ``"aten.add"``) that mean this op.
        args: names of the positional arguments, shared by the aliases.
    """
    names = tuple(args)

    def decorator(rule: OpRule) -> OpRule:
        _OP_RULES[name] = rule
        for key in (name, f"aten.{name}", f"method:{name}", *aliases):
            _ALIASES.setdefault(key, (name, names))
        return rule

    return decorator


def register_alias(key: Any, name: str, args: Iterable[str] | None = None) -> None:
    """Make ``key`` (a callable or string) another way of writing canonical op ``name``."""
    if name not in _OP_RULES:
        raise KeyError(f"no op rule named {name!r}")
    _ALIASES[key] = (name, tuple(args) if args is not None else _ALIASES[name][1])


def register_module_rule(module_type: type[nn.Module], rule: ModuleRule | None = None) -> Any:
    """Register the rule for a module type; modules with a rule are kept whole when tracing.

    Use as ``register_module_rule(MyModule, rule)`` or as a decorator
    ``@register_module_rule(MyModule)``. Inside the rule, ``call.module`` is the instance,
    ``ctx.state("weight")`` its state tensors, ``call.input(i)`` its inputs and ``call.out``
    its output.
    """
    if rule is None:
        def decorator(function: ModuleRule) -> ModuleRule:
            _MODULE_RULES[module_type] = function
            return function

        return decorator
    _MODULE_RULES[module_type] = rule
    return rule


def module_rule_for(module: nn.Module) -> ModuleRule | None:
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
    if call.arg_names is not None:
        arg_names = call.arg_names
    args: dict[str, Any] = {}
    positional = list(call.args)
    for arg_name, value in zip(arg_names, positional):
        args[arg_name] = value
    varargs = positional[len(arg_names):]
    for key, value in call.kwargs.items():
        args["input" if key == "self" else key] = value
    return BoundCall(call, name, args, varargs), _OP_RULES[name]
