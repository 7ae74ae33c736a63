"""CPU implementations of the fused ops: torch's own fused CPU kernels where they compute the same function.

The semantics are those of codegen/reference.py (tests hold the two equal); these paths exist so that a model
compiled with tilefuse is not slower than eager on CPU. Cases a fused torch kernel cannot express (softcap,
ALiBi, dropout, whose keep mask must be the Triton kernels' Philox draw) run the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference as ref
from .attention_args import check_attention_mask


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


def _runs_reference(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> bool:
    # torch's CPU flash kernel returns NaN for causal attention with a scale <= 0 (its causal block skipping
    # assumes a positive scale), so those sites take the reference too.
    causal_nonpositive = flags.causal and flags.scale <= 0
    return flags.softcap > 0 or inputs.alibi_slopes is not None or flags.dropout_p > 0 or causal_nonpositive


def attention(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> Tensor:
    """reference.attention_forward through SDPA's fused CPU kernel; softcap, ALiBi and dropout run the reference."""
    q, k, v, mask, _, cos, sin = inputs[:7]
    check_attention_mask(mask, q.shape[:3], k.shape[2])
    if _runs_reference(inputs, flags):
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


def attention_with_lse(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> tuple[Tensor, Tensor]:
    """(out, lse): reference.attention_forward and the log-sum-exp of its masked scores (see attention_lse).

    CPU tensors without softcap, ALiBi or dropout take torch's flash CPU kernel, which returns both at once.
    """
    q, k, v = inputs[:3]
    check_attention_mask(inputs.mask, q.shape[:3], k.shape[2])
    if q.numel() == 0 or k.shape[-2] == 0:  # the flash CPU kernel divides by zero on empty inputs
        out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=torch.result_type(q, v))
        return out, q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
    if q.device.type == "cpu" and not _runs_reference(inputs, flags):
        return _flash_cpu(inputs, flags)
    return attention(inputs, flags), attention_lse(inputs, flags)


def _flash_cpu(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> tuple[Tensor, Tensor]:
    """The flash CPU kernel on GQA-expanded, head-dim-padded inputs; its lse is 0 on fully masked rows: -inf here."""
    q, k, v, mask, _, cos, sin = inputs[:7]
    qr, kr = ref.rope_qk(q, k, cos, sin, flags.rope_layout, flags.rotary_dim)
    dtype = torch.promote_types(torch.promote_types(qr.dtype, kr.dtype), v.dtype)
    q_len, kv_len, head_dim, v_dim = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    attn_mask, is_causal = _sdpa_mask(mask, q_len, kv_len, flags.causal, flags.bottom_right, flags.window, q.device)
    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if attn_mask.dtype == torch.bool:  # the kernel takes only an additive mask of q's dtype
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        attn_mask = attn_mask.to(dtype)
    group = q.shape[1] // k.shape[1]
    kx, vx = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (kr, v))
    width = max(head_dim, v_dim)  # the kernel wants one head dim; zero features change neither QKᵀ nor PV
    qp, kp, vp = (_unit_last_stride(F.pad(t.to(dtype), (0, width - t.shape[-1]))) for t in (qr, kx, vx))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qp, kp, vp, 0.0, is_causal, attn_mask=attn_mask, scale=flags.scale
    )
    lse = lse.float()
    if attn_mask is not None:
        alive = (attn_mask > float("-inf")).any(dim=-1)
        lse = lse.masked_fill(~alive.expand(lse.shape), float("-inf"))
    return out[..., :v_dim].to(torch.result_type(q, v)), lse


def _unit_last_stride(t: Tensor) -> Tensor:
    """t with stride 1 along its last dim (a copy only when it has another): the flash CPU kernel reads q, k and v
    rows as if their features were adjacent, and gives a wrong answer for a transposed or permuted operand."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def attention_lse(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> Tensor:
    """fp32 [B, Hq, Nq] natural-log log-sum-exp over keys of the scores reference.attention_probs normalizes
    (scaled, soft-capped, ALiBi and masks applied); -inf on fully masked rows. Dropout does not change it."""
    scores, _ = ref.masked_scores(ref.rotated_qk(inputs, flags), flags)
    return torch.logsumexp(scores, dim=-1).float()


def norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, weight_offset: float, rms: bool,
    eps_mode: str = "mean_square", norm_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """Same function as reference.norm_forward(...)[0], through torch's fused layer_norm / rms_norm (the reference
    itself for an eps placement torch's ops do not have)."""
    if eps_mode != "mean_square" or norm_scale != 1.0:
        return ref.norm_forward(x, weight, bias, eps, weight_offset, rms, eps_mode, norm_scale)[0]
    ct = ref.compute_dtype(x.dtype)
    width = (x.shape[-1],)
    w = None if weight is None else (weight.to(ct) + weight_offset if weight_offset else weight.to(ct))
    b = None if bias is None else bias.to(ct)
    y = torch.rms_norm(x.to(ct), width, w, eps) if rms else F.layer_norm(x.to(ct), width, w, b, eps)
    return y.to(ref.norm_out_dtype(x, weight, bias))
