"""CPU implementations of the fused ops: torch's own fused CPU kernels where they compute the same function.

The semantics are those of codegen/reference.py (tests hold the two equal); these paths exist so that a model
compiled with tilefuse is not slower than eager on CPU. Cases a fused torch kernel cannot express (softcap,
ALiBi) run the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference as ref


def _sdpa_mask(
    mask: Tensor | None, q_len: int, kv_len: int, causal: bool, bottom_right: bool, window: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA: plain top-left causal stays a flag, everything else one mask tensor."""
    if causal and window <= 0 and mask is None and (not bottom_right or q_len == kv_len):
        return None, True
    keep = ref.keep_mask(q_len, kv_len, causal, bottom_right, window, device)
    if keep is None:
        return mask, False
    if mask is None:
        return keep, False
    if mask.dtype == torch.bool:
        return keep & mask, False
    return mask.masked_fill(~keep, float("-inf")), False


def attention(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> Tensor:
    """reference.attention_forward through SDPA's fused CPU kernel; softcap and ALiBi run the reference."""
    q, k, v, mask, alibi_slopes, cos, sin = inputs
    if flags.softcap > 0 or alibi_slopes is not None:
        return ref.attention_forward(inputs, flags)
    qr, kr = ref.rope_qk(q, k, cos, sin, flags.rope_layout, flags.rotary_dim)
    dtype = torch.promote_types(torch.promote_types(qr.dtype, kr.dtype), v.dtype)
    attn_mask, is_causal = _sdpa_mask(
        mask, q.shape[-2], k.shape[-2], flags.causal, flags.bottom_right, flags.window, q.device
    )
    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))  # SDPA wants 4-D
        attn_mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    out = F.scaled_dot_product_attention(
        qr.to(dtype),
        kr.to(dtype),
        v.to(dtype),
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=flags.scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.to(torch.result_type(q, v))


def norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, weight_offset: float, rms: bool) -> Tensor:
    """Same function as reference.norm_forward(...)[0], through torch's fused layer_norm / rms_norm."""
    ct = ref.compute_dtype(x.dtype)
    width = (x.shape[-1],)
    w = None if weight is None else (weight.to(ct) + weight_offset if weight_offset else weight.to(ct))
    b = None if bias is None else bias.to(ct)
    y = torch.rms_norm(x.to(ct), width, w, eps) if rms else F.layer_norm(x.to(ct), width, w, b, eps)
    return y.to(ref.norm_out_dtype(x, weight, bias))
