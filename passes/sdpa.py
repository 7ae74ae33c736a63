"""Read every `scaled_dot_product_attention` ATen variant into an AttentionMatch.

Each variant spells the same arguments at different positions; the table below names them once. Variants that
return extra outputs (log-sum-exp, debug masks) are matched only when those outputs are unused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from .attention_match import AttentionMatch, skip_casts, walk_kv
from .base import Decline
from .graph import arg, aten, ndim
from .masks import is_bool
from .scalars import ScalarProduct, fixed_scalar, scalar_arg


@dataclass(frozen=True)
class SdpaSignature:
    """Argument positions (and keyword names) of one SDPA variant; -1 = not present."""

    mask: tuple[int, str]
    dropout: tuple[int, str]
    causal: tuple[int, str]
    scale: tuple[int, str]
    gqa: tuple[int, str]
    tuple_output: bool
    dropout_mask: tuple[int, str] = (-1, "")


# fmt: off
SDPA_VARIANTS: dict[Any, SdpaSignature] = {
    aten.scaled_dot_product_attention: SdpaSignature(
        (3, "attn_mask"), (4, "dropout_p"), (5, "is_causal"), (6, "scale"), (7, "enable_gqa"), False),
    aten._scaled_dot_product_attention_math: SdpaSignature(
        (3, "attn_mask"), (4, "dropout_p"), (5, "is_causal"), (7, "scale"), (8, "enable_gqa"), True,
        dropout_mask=(6, "dropout_mask")),
    aten._scaled_dot_product_flash_attention: SdpaSignature(
        (-1, ""), (3, "dropout_p"), (4, "is_causal"), (6, "scale"), (-1, ""), True),
    aten._scaled_dot_product_flash_attention_for_cpu: SdpaSignature(
        (5, "attn_mask"), (3, "dropout_p"), (4, "is_causal"), (6, "scale"), (-1, ""), True),
    aten._scaled_dot_product_efficient_attention: SdpaSignature(
        (3, "attn_bias"), (5, "dropout_p"), (6, "is_causal"), (7, "scale"), (-1, ""), True),
    aten._scaled_dot_product_cudnn_attention: SdpaSignature(
        (3, "attn_bias"), (5, "dropout_p"), (6, "is_causal"), (8, "scale"), (-1, ""), True),
}
# fmt: on


def sdpa_signature(node: fx.Node) -> SdpaSignature | None:
    if node.op != "call_function":
        return None
    packet = getattr(node.target, "overloadpacket", None)
    return SDPA_VARIANTS.get(packet)


def _get(node: fx.Node, position: tuple[int, str], default: Any) -> Any:
    index, name = position
    return default if index < 0 else arg(node, index, name, default)


def _output_of(node: fx.Node, tuple_output: bool) -> fx.Node:
    if not tuple_output:
        return node
    firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    others = [u for u in node.users if u not in firsts and u.users]
    if others:
        raise Decline(f"{node.target} extra outputs (log-sum-exp / probabilities) are used")
    if len(firsts) != 1:
        raise Decline(f"{node.target} output is not read exactly once")
    return firsts[0]


def _scale(node: fx.Node, sig: SdpaSignature) -> ScalarProduct | None:
    """SDPA's scale: None for its default 1/sqrt(head_dim); 0.0 and negative scales are kept as given."""
    given = _get(node, sig.scale, None)
    if given is None:
        return None
    scale = scalar_arg(given)
    if scale is None:
        raise Decline(f"SDPA scale {given} is neither a number nor a run-time scalar")
    return ScalarProduct().times(scale)


def match_sdpa_site(node: fx.Node) -> AttentionMatch:
    """Match one SDPA call; raises Decline with a reason."""
    sig = sdpa_signature(node)
    if sig is None:
        raise Decline(f"{node.target} is not an SDPA variant")
    if ndim(node.args[0]) != 4:
        raise Decline(f"SDPA on rank-{ndim(node.args[0])} tensors (only [B, H, N, D] is fused)")
    # SDPA applies any p > 0: it is training-mode dropout
    dropout_p = fixed_scalar(_get(node, sig.dropout, 0.0), "SDPA dropout_p")
    if isinstance(_get(node, sig.dropout_mask, None), fx.Node):
        raise Decline(f"{node.target} is given an explicit dropout mask")
    q, k, v = node.args[:3]
    if not isinstance(q, fx.Node) or not isinstance(k, fx.Node) or not isinstance(v, fx.Node):
        raise Decline("SDPA query, key or value is not a graph value")
    k, k_group = walk_kv(k)
    v, v_group = walk_kv(v)
    if k_group != v_group:
        raise Decline(f"K and V are repeated differently (groups {k_group} and {v_group})")
    match = AttentionMatch(
        anchor=node, output=_output_of(node, sig.tuple_output), q=skip_casts(q), k=k, v=v,
        scale=_scale(node, sig), causal=bool(_get(node, sig.causal, False)), gqa_group=k_group,
        source=str(getattr(node.target, "overloadpacket", node.target)).split(".")[-1],
        enable_gqa=bool(_get(node, sig.gqa, False)), dropout_p=dropout_p,
    )  # fmt: skip
    mask = _get(node, sig.mask, None)
    if isinstance(mask, fx.Node):
        if is_bool(mask):
            match.keeps.append((mask, False))
        else:
            match.additive.append(mask)
    return match
