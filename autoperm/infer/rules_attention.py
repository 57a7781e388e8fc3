"""Rules for attention: scaled dot-product attention and ``nn.MultiheadAttention``.

Heads move as units across queries, keys, values and the output projection; inside a head the
query/key dims share one permutation and the value/output dims another (per head where the
graph allows it: see the fibred groups of :mod:`autoperm.infer.engine`).

Symmetry kinds: the scores ``q k^T`` keep an invertible map ``M`` of the query-key dims on q
with ``M^-T`` on k (the keys' dims are coupled to the queries' as dual: see
:meth:`autoperm.infer.axes.AxisGraph.polarity`); the output ``softmax(.) v`` is linear in v, so
the value-output dims admit invertible maps. Heads, tokens and batches admit permutations only.
``nn.MultiheadAttention`` packs q and k into one weight whose head dims share one axis, so its
query-key dims keep orthogonal maps.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from autoperm.infer.context import RuleContext
from autoperm.infer.registry import BoundCall, define_rule
from autoperm.trace.graph import TensorRef


def attention(ctx: RuleContext, q: TensorRef | None, k: TensorRef | None, v: TensorRef | None, out: TensorRef | None,
              mask: TensorRef | None = None) -> None:
    """Scaled dot-product attention on (..., heads, tokens, dim) tensors.

    Queries and keys share their last axis, values and outputs theirs; query heads equal key
    heads, or with grouped-query attention are ``key heads x queries per key head``.
    """
    if q is None or k is None or v is None or out is None:
        ctx.unknown([t for t in (q, k, v, out, mask) if t is not None])
        return
    ctx.same(q, -1, k, -1, dual=True)
    ctx.same(v, -1, out, -1)
    ctx.carries(q, -1, role="out")
    ctx.carries(k, -1, role="out")
    ctx.carries(v, -1, role="out")
    ctx.carries(out, -1)
    ctx.same(q, -2, out, -2)
    ctx.same(k, -2, v, -2)
    batch = q.ndim - 2
    for d in range(batch):
        ctx.same(q, d, out, d)
        if k.ndim == q.ndim and k.shape[d] == q.shape[d]:
            ctx.same(k, d, q, d)
            ctx.same(v, d, q, d)
        elif k.ndim == q.ndim and d == batch - 1 and k.shape[d] and q.shape[d] % k.shape[d] == 0:
            # grouped-query attention: query head h uses key head h // (Hq / Hk)
            ctx.define(q, d, "product", [ctx.ax(k, d), ctx.atom(q.shape[d] // k.shape[d])])
            ctx.same(k, d, v, d)
        else:
            ctx.unknown([q, k, v, out])
            return
    if mask is not None:
        offset = out.ndim - mask.ndim
        for d in range(mask.ndim):
            if mask.shape[d] == 1:
                continue
            target = d + offset
            if target == out.ndim - 1:
                ctx.same(mask, d, k, -2)
            elif target >= 0:
                ctx.same(mask, d, q if target < batch else out, target if target < batch else -2)


@define_rule("scaled_dot_product_attention", aliases=[F.scaled_dot_product_attention, "aten._scaled_dot_product_flash_attention",
                                                       "aten._scaled_dot_product_efficient_attention",
                                                       "aten._scaled_dot_product_flash_attention_for_cpu",
                                                       "aten._scaled_dot_product_cudnn_attention"],
             args=("query", "key", "value", "attn_mask"), kinds={"invertible"})
def _sdpa(ctx: RuleContext, call: BoundCall) -> None:
    outputs = call.call.output_tensors()
    out = outputs[0] if outputs else None
    attention(ctx, call.tensor("query"), call.tensor("key"), call.tensor("value"), out, call.tensor("attn_mask"))
    for extra in outputs[1:]:  # log-sum-exp and friends of the fused kernels
        ctx.fix(extra)


@define_rule("multi_head_attention", module_types=[nn.MultiheadAttention], kinds={"invertible"})
def _module_mha(ctx: RuleContext, call: BoundCall) -> None:
    """nn.MultiheadAttention: heads move as units across Q, K, V and the output projection."""
    module: nn.MultiheadAttention = call.module
    args = list(call.call.args) + [call.call.kwargs.get(k) for k in ("query", "key", "value") if k in call.call.kwargs]
    query, key, value = (args + [None, None, None])[:3]
    key = key if isinstance(key, TensorRef) else query
    value = value if isinstance(value, TensorRef) else key
    outputs = call.call.outputs
    out = outputs[0] if outputs else None
    involved = [t for t in (query, key, value, *call.call.output_tensors()) if isinstance(t, TensorRef)]
    names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v",
             "out_proj.weight", "out_proj.bias")
    state = {n: ctx.state(n) for n in names}
    positional = list(call.call.args)
    padding_mask = call.call.kwargs.get("key_padding_mask", positional[3] if len(positional) > 3 else None)
    attn_mask = call.call.kwargs.get("attn_mask", positional[5] if len(positional) > 5 else None)
    unsupported = state["bias_k"] is not None or getattr(module, "add_zero_attn", False)
    if not isinstance(query, TensorRef) or out is None or unsupported:
        ctx.unknown(involved + [t for t in state.values() if t is not None])
        return
    heads, embed = module.num_heads, module.embed_dim
    head_dim = embed // heads
    atoms = {"heads": ctx.atom(heads), "qk": ctx.atom(head_dim), "v": ctx.atom(module.vdim // heads if not module._qkv_same_embed_dim else head_dim)}
    for mask in (padding_mask, attn_mask):  # masks address tokens only; a 3-D attn_mask is per head
        if isinstance(mask, TensorRef):
            ctx.fix(mask)
            if mask.ndim == 3:
                ctx.fix_node(atoms["heads"])

    q_axis = ctx.atom(embed)
    k_axis = ctx.atom(embed)
    v_axis = ctx.atom(embed)
    ctx.define_node(q_axis, "product", [atoms["heads"], atoms["qk"]])
    ctx.define_node(k_axis, "product", [atoms["heads"], atoms["qk"]])
    ctx.define_node(v_axis, "product", [atoms["heads"], atoms["v"]])
    for node in (q_axis, k_axis, v_axis, atoms["v"]):
        ctx.carries_node(node)
    ctx.carries_node(atoms["qk"], kinds=("orthogonal",))
    in_weight, in_bias = state["in_proj_weight"], state["in_proj_bias"]
    if in_weight is not None:
        ctx.define(in_weight, 0, "concat", [q_axis, k_axis, v_axis])
        ctx.same(in_weight, 1, query, -1)
        ctx.same(in_weight, 1, key, -1)
        ctx.same(in_weight, 1, value, -1)
        ctx.producer(in_weight, 0)
        ctx.carries(in_weight, 0, role="out")
        ctx.carries(in_weight, 1, role="in")
    else:
        for name, axis, source in (("q_proj_weight", q_axis, query), ("k_proj_weight", k_axis, key), ("v_proj_weight", v_axis, value)):
            weight = state[name]
            ctx.same_node(ctx.ax(weight, 0), axis)
            ctx.same(weight, 1, source, -1)
            ctx.producer(weight, 0)
            ctx.carries(weight, 0, role="out")
            ctx.carries(weight, 1, role="in")
    for source in (query, key, value):
        ctx.carries(source, -1)
    if in_bias is not None:
        ctx.define(in_bias, 0, "concat", [q_axis, k_axis, v_axis])
        ctx.carries(in_bias, 0, role="out")
    out_weight, out_bias = state["out_proj.weight"], state["out_proj.bias"]
    ctx.define(out_weight, 1, "product", [atoms["heads"], atoms["v"]])
    ctx.same(out_weight, 0, out, -1)
    ctx.producer(out_weight, 0)
    ctx.carries(out_weight, 1, role="in")
    ctx.carries(out_weight, 0, role="out")
    ctx.carries(out, -1)
    if out_bias is not None:
        ctx.same(out_bias, 0, out, -1)
        ctx.carries(out_bias, 0, role="out")
    batch_first = module.batch_first
    if query.ndim == 3:
        token, batch = (1, 0) if batch_first else (0, 1)
        ctx.same(query, token, out, token)
        ctx.same(query, batch, out, batch)
        ctx.same(key, batch, query, batch)
        ctx.same(value, batch, query, batch)
        ctx.same(key, token, value, token)
    else:
        ctx.same(query, 0, out, 0)
        ctx.same(key, 0, value, 0)
    if len(outputs) > 1 and outputs[1] is not None:  # averaged attention weights (N, L, S) or per head
        weights = outputs[1]
        if weights.ndim >= 2:
            ctx.same(weights, -2, query, 1 if batch_first and query.ndim == 3 else 0)
            ctx.same(weights, -1, key, 1 if batch_first and key.ndim == 3 else 0)
        if weights.ndim == 4:
            ctx.fix(weights, 1)
            ctx.fix_node(atoms["heads"])

