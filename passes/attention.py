"""Attention pass: recognize every attention site and replace it by one `tilefuse::attention` call.

Sites are anchored on softmax nodes (primitive spellings) and SDPA calls. Masks are analyzed so that causal and
sliding-window structure becomes flags and ALiBi biases become slopes; RoPE ops feeding both Q and K, directly or
through the same head permute, are absorbed into the attention call. Training-mode dropout on the probabilities
(or SDPA's dropout_p) becomes the op's dropout_p plus a node that draws its rng; the op returns (out, lse) and
the site's users read item 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..codegen.custom_ops import RNG_HIGH
from ..specs import AttentionSpec, RopeSpec
from .attention_mask import SiteMask, build_mask, check_biases, mask_inputs
from .attention_match import SOFTMAX, AttentionMatch, match_softmax_site
from .base import Decline, PassContext, PassResult
from .graph import (
    aten,
    escaping_nodes,
    getitem,
    insert_call,
    is_op,
    region_between,
    replace_with,
    static_shape,
    tensor_val,
)
from .head_fold import merge_heads, unfold_heads
from .rope_absorb import absorb_rope
from .sdpa import match_sdpa_site, sdpa_signature


@dataclass(frozen=True)
class AttentionPass:
    name: str = "attention"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.is_enabled("attention"):
            return PassResult(gm, False)
        anchors = [n for n in gm.graph.nodes if is_op(n, *SOFTMAX) or sdpa_signature(n) is not None]
        modified = False
        for anchor in anchors:
            try:
                match = match_sdpa_site(anchor) if sdpa_signature(anchor) else match_softmax_site(anchor)
                spec, detail = _rewrite(gm.graph, match, ctx)
            except Decline as decline:
                ctx.declined("attention", anchor, decline.reason, decline.spec)
                continue
            ctx.fused("attention", anchor, spec, **detail)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def _rewrite(graph: fx.Graph, match: AttentionMatch, ctx: PassContext) -> tuple[AttentionSpec, dict[str, Any]]:
    q_val, k_val, v_val = (tensor_val(n) for n in (match.q, match.k, match.v))
    if q_val is None or k_val is None or v_val is None:
        raise Decline("Q, K or V has no tensor metadata")
    _check_shapes(q_val, k_val, v_val, match)
    check_biases(match)
    q_len, kv_len = q_val.shape[-2], k_val.shape[-2]
    # Every check that can decline runs before the first node is inserted, so a declined site leaves no trace.
    region = region_between(graph, [match.q, match.k, match.v, *mask_inputs(match)], match.output)
    escaped = escaping_nodes(region, match.output)
    if escaped:
        names = ", ".join(sorted(n.name for n in escaped)[:3])
        raise Decline(f"intermediate(s) {names} of the attention are used outside it")
    with graph.inserting_before(match.output):
        mask = build_mask(graph, match, q_len, kv_len)
        if match.heads_folded is not None:
            heads = match.heads_folded
            match.q, match.k, match.v = (unfold_heads(graph, n, heads) for n in (match.q, match.k, match.v))
        rope = absorb_rope(graph, match, region, ctx)
    spec = _spec(match, mask, q_val, v_val, rope)
    _emit(graph, match, mask, spec)
    _erase_replaced(graph, region | {match.anchor})
    return spec, mask.detail


def _erase_replaced(graph: fx.Graph, nodes: set[fx.Node]) -> None:
    """Erase the site's now-unused nodes, including ops dead-code elimination keeps as impure (SDPA and
    dropout are tagged nondeterministic_seeded) and unused outputs of tuple-returning SDPA variants."""
    pending = set(nodes) | {u for n in nodes for u in n.users if not u.users and u.op == "call_function"}
    progress = True
    while progress:
        dead = [n for n in pending if not n.users]
        for node in dead:
            graph.erase_node(node)
        pending.difference_update(dead)
        progress = bool(dead)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, match: AttentionMatch) -> None:
    if q.dim() != k.dim() or k.dim() != v.dim() or q.dim() not in (3, 4):
        raise Decline(f"Q/K/V ranks {q.dim()}/{k.dim()}/{v.dim()} are not a [B, H, N, D] attention")
    if q.dim() == 4:
        hq, hk = q.shape[1], k.shape[1]
        if not isinstance(hq, int) or not isinstance(hk, int) or hk == 0 or hq % hk:
            raise Decline(f"query heads {hq} are not a multiple of key/value heads {hk}")
        match.gqa_group = hq // hk
    if match.scale is None:
        head_dim = q.shape[-1]
        if not isinstance(head_dim, int):
            raise Decline("head dim is symbolic and no explicit scale is given")
        match.scale = 1.0 / math.sqrt(head_dim)


def _spec(
    match: AttentionMatch, mask: SiteMask, q: torch.Tensor, v: torch.Tensor, rope: RopeSpec | None
) -> AttentionSpec:
    qs, ks = static_shape(match.q), static_shape(match.k)
    four = len(qs) == 4
    mask_shape = static_shape(mask.node) if mask.node is not None else ()
    return AttentionSpec(
        batch=qs[0], q_heads=qs[1] if four else 1, kv_heads=ks[1] if four else 1, q_len=qs[-2], kv_len=ks[-2],
        head_dim=int(q.shape[-1]), v_head_dim=int(v.shape[-1]), dtype=str(q.dtype).removeprefix("torch."),
        scale=float(match.scale or 1.0), causal=mask.causal, align=mask.align,  # type: ignore[arg-type]
        window=mask.window, softcap=match.softcap, alibi=mask.alibi is not None,
        mask=mask.kind, mask_shape=mask_shape,  # type: ignore[arg-type]
        gqa_group=match.gqa_group, dropout_p=match.dropout_p, rope=rope, source=match.source,
    )  # fmt: skip


def _emit(graph: fx.Graph, match: AttentionMatch, mask: SiteMask, spec: AttentionSpec) -> None:
    q, k, v = match.q, match.k, match.v
    with graph.inserting_before(match.output):
        if match.three_d:
            q, k, v = (insert_call(graph, aten.unsqueeze.default, (n, 1)) for n in (q, k, v))
        tensors = (q, k, v, mask.node, mask.alibi, match.rope_cos, match.rope_sin)
        args = (*tensors, *_op_flags(spec), _dropout_rng(graph, q, spec))
        call = insert_call(graph, torch.ops.tilefuse.attention.default, args)
        call.meta["tilefuse_spec"] = spec
        out = getitem(graph, call, 0)  # (out, lse): the lse reaches only the backward, through autograd
        if match.three_d:
            out = insert_call(graph, aten.squeeze.dim, (out, 1))
        if match.heads_folded is not None:
            out = merge_heads(graph, out)
    out.meta["tilefuse_spec"] = spec
    replace_with(match.output, out)


def _op_flags(spec: AttentionSpec) -> tuple[Any, ...]:
    """The op's scalar arguments, scale ... dropout_p, in its schema's order."""
    layout, rotary_dim = (_layout_code(spec.rope), spec.rope.rotary_dim) if spec.rope is not None else (-1, 0)
    bottom_right = spec.align == "bottom_right"
    window, softcap = spec.window or 0, spec.softcap or 0.0
    return (spec.scale, spec.causal, bottom_right, window, softcap, layout, rotary_dim, spec.dropout_p)


def _dropout_rng(graph: fx.Graph, q: fx.Node, spec: AttentionSpec) -> fx.Node | None:
    """With dropout, a node drawing the op's int64 [seed, offset] from torch's generator on Q's device.

    It is an ordinary random op in the graph, so AOTAutograd runs it once per forward and saves its value for the
    backward, which then drops the same probabilities.
    """
    if not spec.dropout_p:
        return None
    q_val = tensor_val(q)
    device = q_val.device if q_val is not None else None
    return insert_call(graph, aten.randint.low, (0, RNG_HIGH, [2]), {"dtype": torch.int64, "device": device})


def _layout_code(rope: RopeSpec) -> int:
    return 0 if rope.layout == "rotate_half" else 1
