"""Reference torch implementations of every fused op, forward and backward.

They define the semantics the Triton kernels must match, and they are what CPU tensors run. Statistics and softmax
are computed in fp32 (fp64 stays fp64); results are cast back to the op's output dtype once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..specs import ROPE_NONE as ROPE_NONE  # re-exported: the kernels read every RoPE code from here
from ..specs import check_eps_mode, rope_layout_code
from .op_schema import AttnFlags as AttnFlags  # re-exported: the attention op's records, used with these functions
from .op_schema import AttnInputs as AttnInputs
from .philox import uniform

ROPE_ROTATE_HALF = rope_layout_code("rotate_half")
ROPE_INTERLEAVED = rope_layout_code("interleaved")


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


def rope_table_grads(
    grad: Tensor, x: Tensor, layout: int, rotary_dim: int, cos_shape: torch.Size, sin_shape: torch.Size
) -> tuple[Tensor, Tensor]:
    """(dcos, dsin) of y = x·cos + R(x)·sin: dy·x and dy·R(x) on the rotated features (compute dtype), summed
    over the dims each table was broadcast along."""
    ct = compute_dtype(torch.promote_types(grad.dtype, x.dtype))
    g, xr = grad[..., :rotary_dim].to(ct), x[..., :rotary_dim].to(ct)
    return (g * xr).sum_to_size(cos_shape), (g * _rotate(xr, layout)).sum_to_size(sin_shape)


# ------------------------------------------------------------------------------------------------ attention
def keep_mask(
    q_len: int, kv_len: int, causal: bool, bottom_right: bool, window: int, device: torch.device
) -> Tensor | None:
    """Boolean [q_len, kv_len] mask of kept (query, key) pairs for causal/window, or None when neither is set.

    With pos(i) = i (+ kv_len - q_len when bottom_right): causal keeps j <= pos(i); window keeps pos(i) - j < window
    and, on its own, every later key (see AttentionSpec); the kernels' block ranges follow the same rule."""
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


def alibi_distance(q_len: int, kv_len: int, bottom_right: bool, device: torch.device) -> Tensor:
    """[q_len, kv_len] k - q (q shifted by kv_len - q_len when bottom-right aligned): ALiBi adds slope times this."""
    offset = kv_len - q_len if bottom_right else 0
    return torch.arange(kv_len, device=device) - (torch.arange(q_len, device=device).unsqueeze(-1) + offset)


def _expand_kv(t: Tensor, group: int) -> Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def masked_scores(rotated: AttnInputs, flags: AttnFlags) -> tuple[Tensor, Tensor | None]:
    """Scores S (compute dtype; scaled, soft-capped, ALiBi added, masked-out pairs -inf) of inputs whose q, k are
    already rotated (`rotated_qk`), and tanh(S/softcap) before the cap (for the softcap backward)."""
    q, k, mask, alibi_slopes = rotated.q, rotated.k, rotated.mask, rotated.alibi_slopes
    ct = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q.to(ct), _expand_kv(k, group).to(ct).transpose(-1, -2)) * flags.scale
    tanh_scores = None
    if flags.softcap > 0:
        tanh_scores = torch.tanh(scores / flags.softcap)
        scores = tanh_scores * flags.softcap
    q_len, kv_len = scores.shape[-2], scores.shape[-1]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(ct).reshape(*alibi_slopes.shape, 1, 1)
        scores = scores + slopes * alibi_distance(q_len, kv_len, flags.bottom_right, q.device).to(ct)
    keep = keep_mask(q_len, kv_len, flags.causal, flags.bottom_right, flags.window, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            scores = scores + mask.to(ct)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores, tanh_scores


def attention_probs(rotated: AttnInputs, flags: AttnFlags) -> tuple[Tensor, Tensor | None]:
    """Probabilities P (compute dtype; 0 on fully masked rows) and tanh(S/softcap) of inputs whose q, k are already
    rotated (`rotated_qk`)."""
    scores, tanh_scores = masked_scores(rotated, flags)
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


def rotated_qk(inputs: AttnInputs, flags: AttnFlags) -> AttnInputs:
    """The inputs with q and k rotated by their RoPE tables (unchanged without RoPE)."""
    qr, kr = rope_qk(inputs.q, inputs.k, inputs.cos, inputs.sin, flags.rope_layout, flags.rotary_dim)
    return inputs._replace(q=qr, k=kr)


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
    q, k, v = inputs.q, inputs.k, inputs.v
    probs, _ = attention_probs(rotated_qk(inputs, flags), flags)
    dropout = _dropout_scale(probs, inputs, flags)
    if dropout is not None:
        probs = probs * dropout  # on normalized P, after the softmax statistics: lse is unaffected
    group = q.shape[1] // k.shape[1]
    out = torch.matmul(probs, _expand_kv(v, group).to(probs.dtype))
    return out.to(torch.result_type(q, v))


def _reduce_group(t: Tensor, group: int) -> Tensor:
    return t if group == 1 else t.unflatten(1, (-1, group)).sum(dim=2)


# Gradients of one attention call's tensor inputs, in the inputs' own record: None for an input that is absent or
# was not asked for, and for rng, which has none.
AttnGrads = AttnInputs


# Which of (mask, alibi_slopes, cos, sin) want a gradient: the common case asks for none.
NO_EXTRA_GRADS = (False, False, False, False)


def attention_backward(
    grad_out: Tensor, inputs: AttnInputs, flags: AttnFlags, grad_lse: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV by the FlashAttention-2 formulas (see attention_grads)."""
    dq, dk, dv = attention_grads(grad_out, inputs, flags, grad_lse=grad_lse)[:3]
    return dq, dk, dv


def attention_grads(
    grad_out: Tensor,
    inputs: AttnInputs,
    flags: AttnFlags,
    wanted: Sequence[bool] = NO_EXTRA_GRADS,
    grad_lse: Tensor | None = None,
) -> AttnGrads:
    """dQ, dK, dV, and the gradients of (mask, alibi_slopes, cos, sin) flagged in `wanted` where present.

    dS = P ∘ (dP - rowsum(dO ∘ O)) is the gradient of the biased scores (0 where masked); a float mask's and the
    ALiBi slopes' gradients are dS reduced over their broadcast dims (slopes weighted by k - q), and softcap's
    derivative applies after them, since both are added after the cap. With dropout (keep mask M,
    r = 1/(1-p)) O = (P∘M·r)V, so dV uses the dropped P, dP = (dO·Vᵀ)∘M·r, and rowsum(P∘dP) = rowsum(dO∘O)
    still: delta needs no mask. A gradient `grad_lse` [B, Hq, Nq] on the forward's log-sum-exp adds P·dlse to
    dS (d lse / dS = P), so the row term becomes rowsum(dO ∘ O) - dlse (attention sinks rescale O by a function
    of lse).
    """
    q, k, v, cos, sin = inputs.q, inputs.k, inputs.v, inputs.cos, inputs.sin
    scale, rope_layout, rotary_dim = flags.scale, flags.rope_layout, flags.rotary_dim
    rotated = rotated_qk(inputs, flags)
    qr, kr = rotated.q, rotated.k
    probs, tanh_scores = attention_probs(rotated, flags)
    dv, d_biased = _probs_grads(grad_out, probs, v, inputs, flags, grad_lse)
    ds = d_biased if tanh_scores is None else d_biased * (1 - tanh_scores * tanh_scores)
    group = q.shape[1] // k.shape[1]
    dqr = torch.matmul(ds, _expand_kv(kr, group).to(ds.dtype)) * scale
    dkr = _reduce_group(torch.matmul(ds.transpose(-1, -2), qr.to(ds.dtype)), group) * scale
    rotary = cos is not None and sin is not None and rope_layout != ROPE_NONE
    if rotary:
        dq = rope_backward(dqr, cos, sin, rope_layout, rotary_dim, q.dtype)  # type: ignore[arg-type]
        dk = rope_backward(dkr, cos, sin, rope_layout, rotary_dim, k.dtype)  # type: ignore[arg-type]
    else:
        dq, dk = dqr.to(q.dtype), dkr.to(k.dtype)
    mask_grad, slopes_grad = _bias_grads(d_biased, inputs, flags, wanted)
    cos_grad, sin_grad = _table_grads((dqr, dkr), inputs, flags, wanted) if rotary else (None, None)
    return AttnGrads(dq, dk, dv.to(v.dtype), mask_grad, slopes_grad, cos_grad, sin_grad)


def _probs_grads(
    grad_out: Tensor, probs: Tensor, v: Tensor, inputs: AttnInputs, flags: AttnFlags, grad_lse: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(dV, dS) where dS is the gradient of the scores after softcap, ALiBi and mask (compute dtype)."""
    group = probs.shape[1] // v.shape[1]
    do = grad_out.to(probs.dtype)
    v_full = _expand_kv(v, group).to(probs.dtype)
    dropout = _dropout_scale(probs, inputs, flags)
    dropped = probs if dropout is None else probs * dropout
    out = torch.matmul(dropped, v_full)
    dv = _reduce_group(torch.matmul(dropped.transpose(-1, -2), do), group)
    dp = torch.matmul(do, v_full.transpose(-1, -2))
    if dropout is not None:
        dp = dp * dropout
    delta = (do * out).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(probs.dtype).unsqueeze(-1)
    return dv, probs * (dp - delta)


def _bias_grads(
    d_biased: Tensor, inputs: AttnInputs, flags: AttnFlags, wanted: Sequence[bool]
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of a float mask (dS summed to the mask's shape) and of the ALiBi slopes (Σ dS·(k - q))."""
    mask, slopes = inputs.mask, inputs.alibi_slopes
    mask_grad = slopes_grad = None
    if wanted[0] and mask is not None and mask.dtype != torch.bool:
        mask_grad = d_biased.sum_to_size(mask.shape).to(mask.dtype)
    if wanted[1] and slopes is not None:
        q_len, kv_len = d_biased.shape[-2], d_biased.shape[-1]
        distance = alibi_distance(q_len, kv_len, flags.bottom_right, d_biased.device).to(d_biased.dtype)
        slopes_grad = (d_biased * distance).sum(dim=(-2, -1)).sum_to_size(slopes.shape).to(slopes.dtype)
    return mask_grad, slopes_grad


def _table_grads(
    rotated_grads: tuple[Tensor, Tensor], inputs: AttnInputs, flags: AttnFlags, wanted: Sequence[bool]
) -> tuple[Tensor | None, Tensor | None]:
    """cos/sin gradients: the RoPE table gradients of the Q and the K rotation, added."""
    cos, sin = inputs.cos, inputs.sin
    if cos is None or sin is None or not (wanted[2] or wanted[3]):
        return None, None
    layout, dim = flags.rope_layout, flags.rotary_dim
    (q_cos, q_sin), (k_cos, k_sin) = (
        rope_table_grads(grad, x, layout, dim, cos.shape, sin.shape)
        for grad, x in zip(rotated_grads, (inputs.q, inputs.k), strict=True)
    )
    d_cos = (q_cos + k_cos).to(cos.dtype) if wanted[2] else None
    return d_cos, (q_sin + k_sin).to(sin.dtype) if wanted[3] else None


# ----------------------------------------------------------------------------------------------------- norms
def norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, weight_offset: float, rms: bool,
    eps_mode: str = "mean_square", norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(y, mean, rstd): y = (x - mean)·rstd·(w + offset) + b; RMSNorm has mean = 0. Stats in fp32. `eps_mode` and
    `norm_scale` place eps as specs.NormSpec says (rstd = 1/sqrt(stat² + eps), 1/max(stat, eps) or 1/(stat + eps))."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    mean = torch.zeros_like(xf[..., :1]) if rms else xf.mean(dim=-1, keepdim=True)
    centered = xf - mean
    rstd = inverse_norm((centered * centered).mean(dim=-1, keepdim=True), eps, eps_mode, norm_scale)
    y = centered * rstd
    if weight is not None:
        y = y * (weight.to(ct) + weight_offset)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(norm_out_dtype(x, weight, bias)), mean, rstd


def inverse_norm(mean_square: Tensor, eps: float, eps_mode: str, norm_scale: float) -> Tensor:
    """rstd from a row's mean square: eps added to stat², clamping stat, or added to stat (stat = scale·RMS)."""
    mode = check_eps_mode(eps_mode)
    if mode == "mean_square":
        return torch.rsqrt(mean_square * (norm_scale * norm_scale) + eps)
    stat = mean_square.sqrt() * norm_scale
    if mode == "clamp_norm":
        return 1.0 / stat.clamp_min(eps)
    return 1.0 / (stat + eps)  # add_norm


def projection_gain(centered: Tensor, eps: float, eps_mode: str, norm_scale: float) -> Tensor | float:
    """The backward's x̂·Σ(g·w·x̂)/width term is scaled by this: norm_scale², times 0 where F.normalize's clamp holds
    (rstd is constant there; torch's clamp_min passes the gradient where stat >= eps) or 1 + eps/stat for an
    added eps (d rstd/d stat = -rstd², not -rstd³·stat)."""
    gain, mode = norm_scale * norm_scale, check_eps_mode(eps_mode)
    if mode == "mean_square":
        return gain
    stat = (centered * centered).mean(dim=-1, keepdim=True).sqrt() * norm_scale
    if mode == "clamp_norm":
        return torch.where(stat >= eps, gain, 0.0)
    return gain * (1.0 + eps / torch.where(stat > 0, stat, 1.0))  # a zero row has x̂ = 0: keep the factor finite


def norm_out_dtype(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> torch.dtype:
    """Output dtype of a norm: the input dtype promoted with the parameters' dtypes."""
    out = x.dtype
    for param in (weight, bias):
        if param is not None:
            out = torch.promote_types(out, param.dtype)
    return out


def norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, weight_offset: float, rms: bool,
    eps: float = 0.0, eps_mode: str = "mean_square", norm_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """(dx, dweight, dbias) reduced over all leading dims; dweight is None without a weight, dbias None for RMSNorm
    (it has no bias). eps matters only with eps_mode clamp_norm / add_norm."""
    ct = mean.dtype
    g = grad.to(ct)
    centered = x.to(ct) - mean
    xhat = centered * rstd
    lead = tuple(range(g.dim() - 1))
    dweight = (g * xhat).sum(dim=lead) if weight is not None else None
    dbias = g.sum(dim=lead) if not rms else None
    gw = g * (weight.to(ct) + weight_offset) if weight is not None else g
    width = x.shape[-1]
    proj = (gw * xhat).sum(dim=-1, keepdim=True) / width * projection_gain(centered, eps, eps_mode, norm_scale)
    dx = gw - xhat * proj
    if not rms:
        dx = dx - gw.sum(dim=-1, keepdim=True) / width
    dx = dx * rstd
    return dx.to(x.dtype), dweight.to(weight.dtype) if (dweight is not None and weight is not None) else None, dbias
