"""Inference of permutation groups: the op-rule table, the axis graph and ``infer_spec``."""

from autoperm.infer.context import RuleContext
from autoperm.infer.engine import UnsupportedOpWarning, infer_spec
from autoperm.infer.registry import (
    BoundCall,
    has_module_rule,
    register_alias,
    register_module_rule,
    register_op_rule,
)

__all__ = [
    "BoundCall",
    "RuleContext",
    "UnsupportedOpWarning",
    "has_module_rule",
    "infer_spec",
    "register_alias",
    "register_module_rule",
    "register_op_rule",
]
