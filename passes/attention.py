"""Attention pass: recognize every attention site and replace it by one `tilefuse::attention` call.

Sites are anchored on softmax nodes (primitive spellings) and SDPA calls. Masks are analyzed so that causal and
sliding-window structure becomes flags; RoPE ops feeding both Q and K are absorbed into the attention call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..specs import AttentionSpec, RopeSpec
from .attention_match import SOFTMAX, AttentionMatch, match_softmax_site
from .base import Decline, PassContext, PassResult
from .graph import aten, escaping_nodes, insert_call, is_op, region_between, replace_with, static_shape, tensor_val
from .masks import MaskFacts, analyze_keep, classify, is_bool, keep_from_additive
from .sdpa import match_sdpa_site, sdpa_signature

ROPE_LAYOUT_NAMES = {0: "rotate_half", 1: "interleaved"}


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
                spec = _rewrite(gm.graph, match, ctx)
            except Decline as decline:
                ctx.declined("attention", anchor, decline.reason, decline.spec)
                continue
            ctx.fused("attention", anchor, spec)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


@dataclass
class _Mask:
    node: fx.Node | None
    kind: str
    causal: bool
    align: str
    window: int | None
    inputs: list[fx.Node]


def _rewrite(graph: fx.Graph, match: AttentionMatch, ctx: PassContext) -> AttentionSpec:
    q_val, k_val, v_val = (tensor_val(n) for n in (match.q, match.k, match.v))
    if q_val is None or k_val is None or v_val is None:
        raise Decline("Q, K or V has no tensor metadata")
    _check_shapes(q_val, k_val, v_val, match)
    q_len, kv_len = static_shape(match.q)[-2], static_shape(match.k)[-2]
    # Every check that can decline runs before the first node is inserted, so a declined site leaves no trace.
    region = region_between(graph, [match.q, match.k, match.v, *_mask_inputs(match)], match.output)
    escaped = escaping_nodes(region, match.output)
    if escaped:
        names = ", ".join(sorted(n.name for n in escaped)[:3])
        raise Decline(f"intermediate(s) {names} of the attention are used outside it")
    with graph.inserting_before(match.output):
        mask = _build_mask(graph, match, q_len, kv_len)
    rope = _absorb_rope(match, region, ctx)
    spec = _spec(match, mask, q_val, k_val, v_val, rope)
    _emit(graph, match, mask, spec)
    _erase_replaced(graph, region | {match.anchor})
    return spec


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


def _mask_inputs(match: AttentionMatch) -> list[fx.Node]:
    nodes = [cond for cond, _ in match.keeps] + match.additive
    return [n for n in nodes if isinstance(n, fx.Node)]


def _build_mask(graph: fx.Graph, match: AttentionMatch, q_len: Any, kv_len: Any) -> _Mask:
    for node in match.additive:
        if not isinstance(node, fx.Node) or is_bool(node) or tensor_val(node) is None:
            raise Decline(f"additive mask {getattr(node, 'name', node)} is not a float tensor")
    facts, additive, inputs = MaskFacts(), [], []
    for cond, negated in match.keeps:
        facts = facts.merge(analyze_keep(cond, negated))
        inputs.append(cond)
    for node in match.additive:
        inputs.append(node)
        keep = keep_from_additive(node)
        if keep is not None:
            facts = facts.merge(analyze_keep(*keep))
        else:
            additive.append(node)
    positional, leftover = classify(facts.constraints, q_len, kv_len)
    data = facts.data + leftover
    causal = positional.causal or match.causal
    align = positional.align if positional.causal else "top_left"
    keep_node = _conjoin(graph, data)
    add_node = _sum(graph, additive)
    if keep_node is not None and add_node is not None:
        add_node = insert_call(graph, aten.where.ScalarOther, (keep_node, add_node, float("-inf")))
        keep_node = None
    mask_node = keep_node if keep_node is not None else add_node
    if mask_node is not None and match.three_d and mask_node.meta["val"].dim() == 3:
        mask_node = insert_call(graph, aten.unsqueeze.default, (mask_node, 1))
    return _Mask(mask_node, _mask_kind(mask_node), causal, align, positional.window, inputs)


def _conjoin(graph: fx.Graph, atoms: list[tuple[fx.Node, bool]]) -> fx.Node | None:
    """AND of the atoms, each read by truthiness (a non-boolean atom x stands for x != 0)."""
    out: fx.Node | None = None
    for node, negated in atoms:
        term = node if is_bool(node) else insert_call(graph, aten.ne.Scalar, (node, 0))
        term = insert_call(graph, aten.logical_not.default, (term,)) if negated else term
        out = term if out is None else insert_call(graph, aten.logical_and.default, (out, term))
    return out


def _sum(graph: fx.Graph, nodes: list[fx.Node]) -> fx.Node | None:
    out: fx.Node | None = None
    for node in nodes:
        out = node if out is None else insert_call(graph, aten.add.Tensor, (out, node))
    return out


def _mask_kind(node: fx.Node | None) -> str:
    if node is None:
        return "none"
    val = node.meta["val"]
    if val.dtype != torch.bool:
        return "additive"
    shape = val.shape
    key_padding = val.dim() >= 2 and shape[-2] == 1 and (val.dim() < 3 or shape[-3] == 1)
    return "key_padding" if key_padding else "boolean"


def _absorb_rope(match: AttentionMatch, region: set[fx.Node], ctx: PassContext) -> RopeSpec | None:
    """Fold tilefuse::rope ops on Q and K into the attention when they share cos/sin and nothing else reads them."""
    q, k = match.q, match.k
    rope = torch.ops.tilefuse.rope.default
    if q.target is not rope or k.target is not rope or match.three_d:
        return None
    if q.args[1:] != k.args[1:]:
        return None
    if any(u not in region and u is not match.output for n in (q, k) for u in n.users):
        return None
    spec = q.meta.get("tilefuse_spec")
    q_args: tuple[Any, ...] = q.args
    k_args: tuple[Any, ...] = k.args
    match.q, match.k = q_args[0], k_args[0]
    match.rope_cos, match.rope_sin = q_args[1], q_args[2]
    for site in ctx.sites:
        if site.kind == "rope" and site.node in (q.name, k.name):
            site.detail["fused_into"] = match.anchor.name
    layout = ROPE_LAYOUT_NAMES[int(q_args[3])]
    head_dim = static_shape(q)[-1] or 0
    return spec if isinstance(spec, RopeSpec) else RopeSpec(layout, int(q_args[4]), head_dim)  # type: ignore[arg-type]


def _spec(
    match: AttentionMatch, mask: _Mask, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeSpec | None
) -> AttentionSpec:
    qs, ks = static_shape(match.q), static_shape(match.k)
    four = len(qs) == 4
    mask_shape = static_shape(mask.node) if mask.node is not None else ()
    return AttentionSpec(
        batch=qs[0], q_heads=qs[1] if four else 1, kv_heads=ks[1] if four else 1, q_len=qs[-2], kv_len=ks[-2],
        head_dim=int(q.shape[-1]), v_head_dim=int(v.shape[-1]), dtype=str(q.dtype).removeprefix("torch."),
        scale=float(match.scale or 1.0), causal=mask.causal, align=mask.align,  # type: ignore[arg-type]
        window=mask.window, softcap=match.softcap, mask=mask.kind, mask_shape=mask_shape,  # type: ignore[arg-type]
        gqa_group=match.gqa_group, dropout_p=match.dropout_p, rope=rope, source=match.source,
    )


def _emit(graph: fx.Graph, match: AttentionMatch, mask: _Mask, spec: AttentionSpec) -> None:
    q, k, v = match.q, match.k, match.v
    layout, rotary_dim = (_layout_code(spec.rope), spec.rope.rotary_dim) if spec.rope is not None else (-1, 0)
    cos, sin = match.rope_cos, match.rope_sin
    with graph.inserting_before(match.output):
        if match.three_d:
            q, k, v = (insert_call(graph, aten.unsqueeze.default, (n, 1)) for n in (q, k, v))
        out = insert_call(
            graph, torch.ops.tilefuse.attention.default,
            (q, k, v, mask.node, None, cos, sin, spec.scale, spec.causal, spec.align == "bottom_right",
             spec.window or 0, spec.softcap or 0.0, layout, rotary_dim),
        )
        if match.three_d:
            out = insert_call(graph, aten.squeeze.dim, (out, 1))
    out.meta["tilefuse_spec"] = spec
    replace_with(match.output, out)


def _layout_code(rope: RopeSpec) -> int:
    return 0 if rope.layout == "rotate_half" else 1
