"""PyTorch's fused transformer fast paths, decomposed to their meaning so the passes can fuse what is inside.

In eval mode without grad, `nn.TransformerEncoderLayer` (so `nn.TransformerEncoder` and `nn.Transformer`'s
encoder) calls `aten._transformer_encoder_layer_fwd`: one opaque op for a whole layer, in which no pass can see
attention or a norm. `aten._native_multi_head_attention` is the attention inside it (and what
`nn.MultiheadAttention`'s fast path calls in eager mode). Capture traces both through the decompositions below
(`FAST_PATH_DECOMPOSITIONS`), which compute what the ATen kernels compute: the packed QKV projection, the head
split, attention scaled by 1/sqrt(head_dim) under the merged mask, the out projection, the layer norms before or
after each block, ReLU or exact GELU, and the residual adds.

Mask semantics are the kernels', not SDPA's: the fast path reads its mask as booleans (`mask.to(bool)`), so a
float mask masks every position where it is non-zero (the modules hand it canonical 0/-inf masks, where the two
readings agree); mask_type 0 is an [L, S] attention mask, 1 an [B, S] key padding mask, 2 (or None) a mask that
broadcasts to [B, H, L, S]. The only difference from eager: a query row whose keys are all masked gives NaN in
the ATen kernel and 0 in tilefuse's attention (its documented semantics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .advice import Advice, advise
from .attention_match import SOFTMAX
from .base import PassContext
from .graph import aten, is_op

MASK_TYPE_ATTENTION = 0  # [L, S]
MASK_TYPE_KEY_PADDING = 1  # [B, S]
MASK_TYPE_MERGED = 2  # broadcasts to [B, H, L, S]


def _project(x: Tensor, weight: Tensor, bias: Tensor | None, part: int) -> Tensor:
    """The `part`-th third (0 = Q, 1 = K, 2 = V) of the packed in-projection applied to `x`."""
    chunk = weight.shape[0] // 3
    w = weight[part * chunk : (part + 1) * chunk]
    b = bias[part * chunk : (part + 1) * chunk] if bias is not None else None
    return F.linear(x, w, b)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, T, H * D] → [B, H, T, D]."""
    batch, length = x.shape[0], x.shape[1]
    return x.view(batch, length, num_heads, -1).transpose(1, 2)


def _qkv(
    query: Tensor, key: Tensor, value: Tensor, num_heads: int, weight: Tensor, bias: Tensor | None
) -> list[Tensor]:
    """Q, K and V as [B, H, T, D]: one projection when query, key and value are the same tensor (self-attention,
    as the kernel does it), otherwise each input with its third of the weight."""
    if query is key and key is value:
        packed = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:
        packed = (_project(query, weight, bias, 0), _project(key, weight, bias, 1), _project(value, weight, bias, 2))
    return [_heads(x, num_heads) for x in packed]


def _keep_mask(mask: Tensor | None, mask_type: int | None, batch: Any, kv_len: Any) -> Tensor | None:
    """The kernel's mask as a boolean keep-mask that broadcasts to [B, H, L, S] (True = attend)."""
    if mask is None:
        return None
    # The kernel converts a non-boolean mask with mask.to(bool): every non-zero (and NaN) entry is masked.
    keep = mask.logical_not() if mask.dtype == torch.bool else mask == 0
    if mask_type == MASK_TYPE_KEY_PADDING:
        return keep.view(batch, 1, 1, kv_len)
    return keep  # [L, S] and [B, H, L, S] broadcast as they are


def _attention_with_weights(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, average: bool
) -> tuple[Tensor, Tensor]:
    """Attention that also returns its probabilities (need_weights=True): averaged over heads or per head."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if keep is not None:
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    probs = scores.softmax(dim=-1)
    weights = probs.sum(dim=1) / probs.shape[1] if average else probs
    return probs @ v, weights


def native_multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim: int,
    num_head: int,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    mask: Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    mask_type: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`aten._native_multi_head_attention` (batch-first [B, T, E] inputs) in ops the passes recognize.

    Without weights the attention is one SDPA call (fused by the attention pass); with them it is written out,
    and its probabilities leave the site, so it stays unfused (the attention pass advises need_weights=False).
    """
    if query.is_nested:
        raise ValueError("_native_multi_head_attention on a nested tensor cannot be decomposed")
    if embed_dim % num_head:
        raise ValueError(f"_native_multi_head_attention: embed_dim {embed_dim} is not divisible by {num_head} heads")
    if mask_type not in (MASK_TYPE_ATTENTION, MASK_TYPE_KEY_PADDING, MASK_TYPE_MERGED, None):
        raise ValueError(f"_native_multi_head_attention: mask_type must be 0, 1, 2 or None, got {mask_type}")
    batch, length = query.shape[0], query.shape[1]
    q, k, v = _qkv(query, key, value, num_head, qkv_weight, qkv_bias)
    keep = _keep_mask(mask, mask_type, batch, k.shape[-2])
    if need_weights:
        context, weights = _attention_with_weights(q, k, v, keep, average_attn_weights)
    else:
        context, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=keep), query.new_empty(0)
    out = F.linear(context.transpose(1, 2).reshape(batch, length, -1), proj_weight, proj_bias)
    return out, weights


def transformer_encoder_layer_fwd(
    src: Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    use_gelu: bool,
    norm_first: bool,
    eps: float,
    norm_weight_1: Tensor | None,
    norm_bias_1: Tensor | None,
    norm_weight_2: Tensor | None,
    norm_bias_2: Tensor | None,
    ffn_weight_1: Tensor,
    ffn_bias_1: Tensor | None,
    ffn_weight_2: Tensor,
    ffn_bias_2: Tensor | None,
    mask: Tensor | None = None,
    mask_type: int | None = None,
) -> Tensor:
    """`aten._transformer_encoder_layer_fwd`: one encoder layer, pre-norm (`norm_first`) or post-norm."""
    if src.is_nested:
        raise ValueError("_transformer_encoder_layer_fwd on a nested tensor cannot be decomposed")
    if statically_known_true(src.numel() == 0):
        return src.clone()  # as the kernel does

    def norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    x = norm(src, norm_weight_1, norm_bias_1) if norm_first else src
    attended, _ = native_multi_head_attention(
        x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, False, True, mask_type
    )
    x = attended + src
    if not norm_first:
        x = norm(x, norm_weight_1, norm_bias_1)
    hidden = F.linear(norm(x, norm_weight_2, norm_bias_2) if norm_first else x, ffn_weight_1, ffn_bias_1)
    hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
    x = F.linear(hidden, ffn_weight_2, ffn_bias_2) + x
    return x if norm_first else norm(x, norm_weight_2, norm_bias_2)


# The decomposition table capture hands to make_fx: these ops are traced through the functions above.
FAST_PATH_DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer_fwd,
    aten._native_multi_head_attention.default: native_multi_head_attention,
}


# ------------------------------------------------------------------------------------------------------ advice
_CONTRACTIONS = (aten.matmul, aten.bmm, aten.mm, aten.baddbmm, aten.einsum, aten.linear)


def weights_returned(softmax: fx.Node) -> bool:
    """Whether attention probabilities both feed a contraction (P·V) and reach the graph's output without one
    (as they are, averaged over heads, viewed, cast or dropped out).

    That is how `nn.MultiheadAttention(need_weights=True)` (its default) and Hugging Face's
    `output_attentions=True` return them; a final softmax over logits feeds no contraction and does not count.
    """
    stack, seen = [softmax], {softmax}
    returned = contracted = False
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.op == "output":
                returned = True
            elif is_op(user, *_CONTRACTIONS):
                contracted = True
            elif user not in seen:
                seen.add(user)
                stack.append(user)
    return returned and contracted


def advise_if_weights_returned(anchor: fx.Node, ctx: PassContext) -> None:
    """On a declined attention site: when its probabilities are returned, tell once how to stop asking."""
    if not is_op(anchor, *SOFTMAX) or not weights_returned(anchor):
        return
    ctx.advise(
        "attention_weights_returned",
        "attention probabilities are returned as an output (nn.MultiheadAttention's need_weights=True, its "
        "default, or output_attentions=True in a Hugging Face model), so the attention cannot be fused",
        "call nn.MultiheadAttention with need_weights=False (and leave output_attentions off) unless the weights "
        "are needed",
    )


def module_advice(model: Any) -> list[Advice]:
    """Advice about `model` that no graph can carry, each warned once: an `nn.TransformerEncoder(
    enable_nested_tensor=True, mask_check=False)` given a padding mask turns its input into a nested tensor,
    which Dynamo cannot trace (a graph break), so the whole encoder runs eagerly and nothing in it reaches
    tilefuse. With mask_check=True, the default, PyTorch skips that conversion under torch.compile: the layers get
    the padded batch and the mask (and padded positions are not zeroed, unlike eager)."""
    if not isinstance(model, torch.nn.Module):
        return []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.TransformerEncoder) and _converts_to_nested(module):
            problem = (
                f"{name or 'the model'}: nn.TransformerEncoder(enable_nested_tensor=True, mask_check=False) turns a "
                "padded batch into a nested tensor, which torch.compile cannot trace (graph break): the encoder "
                "runs eagerly and unfused"
            )
            return [advise("nested_tensor_encoder", problem, "build the encoder with enable_nested_tensor=False")]
    return []


def _converts_to_nested(encoder: torch.nn.TransformerEncoder) -> bool:
    return bool(getattr(encoder, "use_nested_tensor", False)) and not getattr(encoder, "mask_check", True)
