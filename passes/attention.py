"""Attention pass: recognize every attention site and replace it by one `tilefuse::attention` call.

Sites are anchored on softmax nodes (primitive spellings) and SDPA calls. Masks are analyzed so that causal and
sliding-window structure becomes flags and ALiBi biases become slopes; RoPE ops feeding both Q and K, directly or
through the same head permute, are absorbed into the attention call. Training-mode dropout on the probabilities
(or SDPA's dropout_p) becomes the op's dropout_p plus a node that draws its rng; the op returns (out, lse) and
the site's users read item 0, laid out with the replaced node's strides (`out_order`, passes/out_layout.py: SDPA's
output is often a [B, N, H, D] buffer seen as [B, H, N, D], which code after it views).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..codegen.op_schema import ATTENTION, RNG_HIGH, AttnFlags
from ..specs import AttentionSpec, RopeSpec
from .attention_contractions import einsums_read_as_matmul
from .attention_mask import SiteMask, build_mask, check_biases, mask_inputs
from .attention_match import SOFTMAX, AttentionMatch, match_softmax_site, scale_biases
from .attention_sinks import rescale_by_sinks
from .base import Decline, FixableDecline, PassContext, PassResult
from .fastpath import advise_if_weights_returned
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
from .match_common import fixed_size
from .out_layout import keep_layout, output_order
from .rope_absorb import absorb_rope
from .scalars import ScalarArg, ScalarProduct, scalar_hint
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
                if sdpa_signature(anchor):
                    spec, detail = _rewrite(gm.graph, match_sdpa_site(anchor), ctx)
                else:
                    with einsums_read_as_matmul(anchor):  # put back if the site is declined
                        spec, detail = _rewrite(gm.graph, match_softmax_site(anchor), ctx)
            except Decline as decline:
                ctx.declined("attention", anchor, decline.reason, decline.spec)
                if isinstance(decline, FixableDecline):
                    ctx.advise(decline.key, f"attention {anchor.name} not fused: {decline.reason}", decline.fix)
                advise_if_weights_returned(anchor, ctx)
                continue
            ctx.fused("attention", anchor, spec, **detail)
            modified = True
        return PassResult(gm, modified)


def _rewrite(graph: fx.Graph, match: AttentionMatch, ctx: PassContext) -> tuple[AttentionSpec, dict[str, Any]]:
    q_val, k_val, v_val = (tensor_val(n) for n in (match.q, match.k, match.v))
    if q_val is None or k_val is None or v_val is None:
        raise Decline("Q, K or V has no tensor metadata")
    _check_shapes(q_val, k_val, v_val, match)
    _check_output_shape(match, q_val, v_val)
    check_biases(match)
    q_len, kv_len = q_val.shape[-2], k_val.shape[-2]
    # Every check that can decline runs before the first node is inserted, so a declined site leaves no trace.
    region = region_between(graph, [match.q, match.k, match.v, *mask_inputs(match)], match.output)
    escaped = escaping_nodes(region, match.output)
    if escaped:
        names = ", ".join(sorted(n.name for n in escaped)[:3])
        raise Decline(f"intermediate(s) {names} of the attention are used outside it")
    with graph.inserting_before(match.output):
        scale_biases(graph, match)
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
        hq, hk = fixed_size(q.shape[1], "query heads"), fixed_size(k.shape[1], "key/value heads")
        if hk == 0 or hq % hk:
            raise Decline(f"query heads {hq} are not a multiple of key/value heads {hk}")
        match.gqa_group = hq // hk
    if match.scale is None:  # SDPA's default; the kernels need a fixed head dim anyway
        match.scale = ScalarProduct(1.0 / math.sqrt(fixed_size(q.shape[-1], "head dim")))
    match.scale.hint()  # declines now, before the graph changes, if a run-time factor has no example value
    if isinstance(match.softcap, fx.Node):
        scalar_hint(match.softcap)


def _check_output_shape(match: AttentionMatch, q: torch.Tensor, v: torch.Tensor) -> None:
    """The op returns q's [B, H, N] with v's head dim; a mask with more batches or heads than q widens the eager
    output instead (a per-document mask [B, 1, N, N] over a batch-1 q), which the op cannot reproduce."""
    out = tensor_val(match.output)
    expected = (*q.shape[:-1], v.shape[-1])
    # compared by element count: BLOOM's heads-in-batch layout folds [B, H] of q into the output's first axis
    if out is not None and math.prod(out.shape) != math.prod(expected):
        raise FixableDecline(
            f"the mask broadcasts the attention output to {tuple(out.shape)}, beyond q's {tuple(expected)}",
            "mask_widens_attention",
            "expand q (and k/v) to the mask's batch and heads before attention",
        )


def _spec(
    match: AttentionMatch, mask: SiteMask, q: torch.Tensor, v: torch.Tensor, rope: RopeSpec | None
) -> AttentionSpec:
    qs, ks = static_shape(match.q), static_shape(match.k)
    four = len(qs) == 4
    scale = match.scale if match.scale is not None else ScalarProduct()  # set by _check_shapes
    softcap_dynamic = isinstance(match.softcap, fx.Node)
    mask_shape = static_shape(mask.node) if mask.node is not None else ()
    return AttentionSpec(
        batch=qs[0], q_heads=qs[1] if four else 1, kv_heads=ks[1] if four else 1, q_len=qs[-2], kv_len=ks[-2],
        head_dim=fixed_size(q.shape[-1], "head dim"), v_head_dim=fixed_size(v.shape[-1], "value head dim"),
        dtype=str(q.dtype).removeprefix("torch."), scale=scale.hint(), causal=mask.causal,
        align=mask.align, window=mask.window, alibi=mask.alibi is not None,  # type: ignore[arg-type]
        softcap=abs(scalar_hint(match.softcap)) if match.softcap is not None else None,
        mask=mask.kind, mask_shape=mask_shape,  # type: ignore[arg-type]
        gqa_group=match.gqa_group, dropout_p=match.dropout_p, rope=rope, source=match.source,
        sinks=match.sinks is not None,
        dynamic_scalars=tuple(name for name, x in (("scale", scale.dynamic), ("softcap", softcap_dynamic)) if x),
    )  # fmt: skip


def _emit(graph: fx.Graph, match: AttentionMatch, mask: SiteMask, spec: AttentionSpec) -> None:
    q, k, v = match.q, match.k, match.v
    with graph.inserting_before(match.output):
        if match.three_d:
            q, k, v = (insert_call(graph, aten.unsqueeze.default, (n, 1)) for n in (q, k, v))
        flags = AttnFlags.from_spec(spec, _run_time_scalars(graph, match))
        rng = _dropout_rng(graph, q, spec)
        # out_order: the replaced node's strides, so code that views the output keeps working
        out_order = output_order(match.output, 4, first_dim_split=match.three_d or match.heads_folded is not None)
        layout = {"out_order": out_order} if out_order is not None else {}
        args = ATTENTION.call_args(
            flags, q=q, k=k, v=v, mask=mask.node, alibi_slopes=mask.alibi, cos=match.rope_cos, sin=match.rope_sin,
            rng=rng, **layout,
        )  # fmt: skip
        call = insert_call(graph, ATTENTION.overload, args)
        call.meta["tilefuse_spec"] = spec
        out = getitem(graph, call, 0)  # (out, lse): the lse reaches only the backward, through autograd
        if match.sinks is not None:  # ... or the sinks' rescale, whose gradient on lse the backward takes
            out = rescale_by_sinks(graph, call, out, match.sinks)
        if match.three_d:
            out = insert_call(graph, aten.squeeze.dim, (out, 1))
        if match.heads_folded is not None:
            out = merge_heads(graph, out)
    out = keep_layout(graph, out, match.output)
    out.meta["tilefuse_spec"] = spec
    replace_with(match.output, out)


def _run_time_scalars(graph: fx.Graph, match: AttentionMatch) -> tuple[ScalarArg, ScalarArg] | None:
    """(scale, softcap) as graph values when either is known only at run time (nodes computing them are
    inserted here); None when both are constants, which the Spec then holds."""
    softcap = match.softcap
    if match.scale is None or not (match.scale.dynamic or isinstance(softcap, fx.Node)):
        return None
    if isinstance(softcap, fx.Node):  # c·tanh(x/c) is even in c and the op takes c > 0
        softcap = insert_call(graph, operator.abs, (softcap,))
    return match.scale.emit(graph), softcap if softcap is not None else 0.0


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
