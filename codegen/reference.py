"""Reference torch implementations of every fused op, forward and backward.

They define the semantics the Triton kernels must match, and they are what CPU tensors run. Statistics and softmax
are computed in fp32 (fp64 stays fp64); results are cast back to the op's output dtype once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .philox import uniform

ROPE_ROTATE_HALF = 0
ROPE_INTERLEAVED = 1
ROPE_NONE = -1


class AttnInputs(NamedTuple):
    """The tensors of one attention call: [B, H, N, D] q/k/v and the optional mask, ALiBi slopes, cos/sin."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None = None
    alibi_slopes: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    rng: Tensor | None = None  # int64 [seed, offset] of the dropout RNG (see dropout_keep)


class AttnFlags(NamedTuple):
    """The scalar arguments of one attention call, in the custom op's order (see AttentionSpec)."""

    scale: float
    causal: bool = False
    bottom_right: bool = False
    window: int = 0
    softcap: float = 0.0
    rope_layout: int = -1
    rotary_dim: int = 0
    dropout_p: float = 0.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------- RoPE
def _rotate(x: Tensor, layout: int) -> Tensor:
    """R(x) for the pairing `layout`; R is antisymmetric, so Rᵀ = -R."""
    if layout == ROPE_ROTATE_HALF:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_forward(x: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int) -> Tensor:
    """y[..., :r] = x·cos + R(x)·sin on the first r features; the rest pass through."""
    ct = compute_dtype(x.dtype)
    xr = x[..., :rotary_dim].to(ct)
    rotated = xr * cos.to(ct) + _rotate(xr, layout) * sin.to(ct)
    out_dtype = torch.result_type(x, cos)
    if rotary_dim == x.shape[-1]:
        return rotated.to(out_dtype)
    return torch.cat((rotated.to(out_dtype), x[..., rotary_dim:].to(out_dtype)), dim=-1)


def rope_backward(grad: Tensor, cos: Tensor, sin: Tensor, layout: int, rotary_dim: int, x_dtype: torch.dtype) -> Tensor:
    """dx = dy·cos + Rᵀ(dy·sin) = dy·cos - R(dy·sin)."""
    ct = compute_dtype(grad.dtype)
    gr = grad[..., :rotary_dim].to(ct)
    dx = gr * cos.to(ct) - _rotate(gr * sin.to(ct), layout)
    if rotary_dim == grad.shape[-1]:
        return dx.to(x_dtype)
    return torch.cat((dx.to(x_dtype), grad[..., rotary_dim:].to(x_dtype)), dim=-1)


# ------------------------------------------------------------------------------------------------ attention
def keep_mask(
    q_len: int, kv_len: int, causal: bool, bottom_right: bool, window: int, device: torch.device
) -> Tensor | None:
    """Boolean [q_len, kv_len] mask of kept (query, key) pairs for causal/window, or None when neither is set."""
    if not causal and window <= 0:
        return None
    offset = kv_len - q_len if bottom_right else 0
    q_pos = torch.arange(q_len, device=device).unsqueeze(-1) + offset
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if window > 0:
        keep &= (q_pos - k_pos) < window
    return keep


def _expand_kv(t: Tensor, group: int) -> Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def masked_scores(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    scale: float,
    causal: bool,
    bottom_right: bool,
    window: int,
    softcap: float,
) -> tuple[Tensor, Tensor | None]:
    """Scores S (compute dtype; scaled, soft-capped, ALiBi added, masked-out pairs -inf) of already-rotated q, k,
    and tanh(S/softcap) before the cap (for the softcap backward)."""
    ct = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q.to(ct), _expand_kv(k, group).to(ct).transpose(-1, -2)) * scale
    tanh_scores = None
    if softcap > 0:
        tanh_scores = torch.tanh(scores / softcap)
        scores = tanh_scores * softcap
    q_len, kv_len = scores.shape[-2], scores.shape[-1]
    offset = kv_len - q_len if bottom_right else 0
    if alibi_slopes is not None:
        rel = torch.arange(kv_len, device=q.device) - (torch.arange(q_len, device=q.device).unsqueeze(-1) + offset)
        slopes = alibi_slopes.to(ct).reshape(*alibi_slopes.shape, 1, 1)
        scores = scores + slopes * rel.to(ct)
    keep = keep_mask(q_len, kv_len, causal, bottom_right, window, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            scores = scores + mask.to(ct)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores, tanh_scores


def attention_probs(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    scale: float,
    causal: bool,
    bottom_right: bool,
    window: int,
    softcap: float,
) -> tuple[Tensor, Tensor | None]:
    """Probabilities P (compute dtype; 0 on fully masked rows) and tanh(S/softcap) of already-rotated q, k."""
    scores, tanh_scores = masked_scores(q, k, mask, alibi_slopes, scale, causal, bottom_right, window, softcap)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    exp = torch.exp(scores - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(denom == 0, torch.ones_like(denom), denom)
    return probs, tanh_scores


def rope_qk(
    q: Tensor, k: Tensor, cos: Tensor | None, sin: Tensor | None, rope_layout: int, rotary_dim: int
) -> tuple[Tensor, Tensor]:
    if cos is None or sin is None or rope_layout == ROPE_NONE:
        return q, k
    return rope_forward(q, cos, sin, rope_layout, rotary_dim), rope_forward(k, cos, sin, rope_layout, rotary_dim)


def dropout_keep(rng: Tensor, shape: tuple[int, int, int, int], p: float) -> Tensor:
    """Bool keep mask (True = kept) of attention dropout over the [B, Hq, Nq, Nk] probabilities, on rng's device.

    rng is int64 [seed, offset]; element (b, h, i, j) is kept iff tl.rand(seed, counter) >= p with the int64
    counter offset + ((b·Hq + h)·Nq + i)·Nk + j, which is what the Triton kernels draw in-kernel.
    """
    if rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
        raise ValueError(f"rng must be an int64 tensor [seed, offset], got {rng.dtype} {tuple(rng.shape)}")
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(f"shape must be [B, Hq, Nq, Nk] with sizes >= 0, got {shape}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    seed, offset = (int(x) for x in rng.tolist())
    counters = offset + torch.arange(math.prod(shape), dtype=torch.int64, device=rng.device).reshape(shape)
    return uniform(seed, counters) >= torch.tensor(p, dtype=torch.float32, device=rng.device)


def _dropout_scale(probs: Tensor, inputs: AttnInputs, flags: AttnFlags) -> Tensor | None:
    """keep / (1 - p) in probs' dtype and device (the factor on P and on dP), or None without dropout."""
    if flags.dropout_p == 0.0:
        return None
    if inputs.rng is None:
        raise ValueError(f"dropout_p={flags.dropout_p} needs the rng tensor [seed, offset]; got rng=None")
    keep = dropout_keep(inputs.rng, tuple(probs.shape), flags.dropout_p).to(probs.device)  # type: ignore[arg-type]
    return keep.to(probs.dtype) * (1.0 / (1.0 - flags.dropout_p))


def attention_forward(inputs: AttnInputs, flags: AttnFlags) -> Tensor:
    q, k, v, mask, alibi_slopes, cos, sin = inputs[:7]
    qr, kr = rope_qk(q, k, cos, sin, flags.rope_layout, flags.rotary_dim)
    probs, _ = attention_probs(
        qr, kr, mask, alibi_slopes, flags.scale, flags.causal, flags.bottom_right, flags.window, flags.softcap
    )
    dropout = _dropout_scale(probs, inputs, flags)
    if dropout is not None:
        probs = probs * dropout  # on normalized P, after the softmax statistics: lse is unaffected
    group = q.shape[1] // k.shape[1]
    out = torch.matmul(probs, _expand_kv(v, group).to(probs.dtype))
    return out.to(torch.result_type(q, v))


def _reduce_group(t: Tensor, group: int) -> Tensor:
    return t if group == 1 else t.unflatten(1, (-1, group)).sum(dim=2)


def attention_backward(grad_out: Tensor, inputs: AttnInputs, flags: AttnFlags) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV by the FlashAttention-2 formulas: dS = P ∘ (dP - rowsum(dO ∘ O)).

    With dropout (keep mask M, r = 1/(1-p)) O = (P∘M·r)V, so dV uses the dropped P, dP = (dO·Vᵀ)∘M·r, and
    rowsum(P∘dP) = rowsum(dO∘O) still: delta needs no mask.
    """
    q, k, v, mask, alibi_slopes, cos, sin = inputs[:7]
    scale, causal, bottom_right, window, softcap, rope_layout, rotary_dim = flags[:7]
    qr, kr = rope_qk(q, k, cos, sin, rope_layout, rotary_dim)
    probs, tanh_scores = attention_probs(qr, kr, mask, alibi_slopes, scale, causal, bottom_right, window, softcap)
    ct = probs.dtype
    group = q.shape[1] // k.shape[1]
    do = grad_out.to(ct)
    v_full = _expand_kv(v, group).to(ct)
    dropout = _dropout_scale(probs, inputs, flags)
    dropped = probs if dropout is None else probs * dropout
    out = torch.matmul(dropped, v_full)
    dv = _reduce_group(torch.matmul(dropped.transpose(-1, -2), do), group)
    dp = torch.matmul(do, v_full.transpose(-1, -2))
    if dropout is not None:
        dp = dp * dropout
    ds = probs * (dp - (do * out).sum(dim=-1, keepdim=True))
    if tanh_scores is not None:
        ds = ds * (1 - tanh_scores * tanh_scores)
    dqr = torch.matmul(ds, _expand_kv(kr, group).to(ct)) * scale
    dkr = _reduce_group(torch.matmul(ds.transpose(-1, -2), qr.to(ct)), group) * scale
    if cos is not None and sin is not None and rope_layout != ROPE_NONE:
        dq = rope_backward(dqr, cos, sin, rope_layout, rotary_dim, q.dtype)
        dk = rope_backward(dkr, cos, sin, rope_layout, rotary_dim, k.dtype)
    else:
        dq, dk = dqr.to(q.dtype), dkr.to(k.dtype)
    return dq, dk, dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------------- norms
def norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, weight_offset: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y = (x - mean)·rstd·(w + offset) + b; RMSNorm has mean = 0. Stats in fp32."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    mean = torch.zeros_like(xf[..., :1]) if rms else xf.mean(dim=-1, keepdim=True)
    centered = xf - mean
    rstd = torch.rsqrt((centered * centered).mean(dim=-1, keepdim=True) + eps)
    y = centered * rstd
    if weight is not None:
        y = y * (weight.to(ct) + weight_offset)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(norm_out_dtype(x, weight, bias)), mean, rstd


def norm_out_dtype(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> torch.dtype:
    """Output dtype of a norm: the input dtype promoted with the parameters' dtypes."""
    out = x.dtype
    for param in (weight, bias):
        if param is not None:
            out = torch.promote_types(out, param.dtype)
    return out


def norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, weight_offset: float, rms: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(dx, dweight, dbias) reduced over all leading dims."""
    ct = mean.dtype
    g = grad.to(ct)
    xhat = (x.to(ct) - mean) * rstd
    lead = tuple(range(g.dim() - 1))
    dweight = (g * xhat).sum(dim=lead) if weight is not None else None
    dbias = g.sum(dim=lead)
    gw = g * (weight.to(ct) + weight_offset) if weight is not None else g
    width = x.shape[-1]
    proj = (gw * xhat).sum(dim=-1, keepdim=True) / width
    dx = gw - xhat * proj
    if not rms:
        dx = dx - gw.sum(dim=-1, keepdim=True) / width
    dx = dx * rstd
    return dx.to(x.dtype), dweight.to(weight.dtype) if (dweight is not None and weight is not None) else None, dbias
