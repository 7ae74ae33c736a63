"""Functional API over the fused ops: call tilefuse's attention, norms and RoPE directly, with autograd.

CUDA tensors run the Triton kernels (falling back to the reference, with a logged reason, for cases a kernel
does not cover); CPU tensors run torch's fused CPU kernels or the reference. Arguments are checked here, so a
mistake raises ValueError/TypeError naming the argument instead of failing inside a kernel.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .codegen import custom_ops as _custom_ops  # noqa: F401  (registers torch.ops.tilefuse)
from .codegen.attention_args import check_attention_mask
from .codegen.launch_configs import launch_config
from .codegen.op_schema import ATTENTION, RNG_HIGH, ROPE, AttnFlags, AttnInputs, norm_op
from .codegen.tile_config import TileConfig
from .specs import ROPE_LAYOUTS, ROPE_NONE, rope_layout_code

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: object, rank: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: float16, bfloat16, float32, float64")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    return t


def _same_device(**tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, rank=4)
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch/heads/seq of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads {q.shape[1]} must be a multiple of k/v heads {k.shape[1]} (GQA)")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise ValueError(f"head dims up to 256 are supported, got q {q.shape[-1]}, v {v.shape[-1]}")


def _rope_args(rope: tuple[Tensor, Tensor] | None, layout: str, rotary_dim: int | None, head_dim: int) -> tuple:
    if rope is None:
        return None, None, ROPE_NONE, 0
    if not isinstance(rope, tuple) or len(rope) != 2:
        raise TypeError("rope must be a (cos, sin) tuple of tensors")
    cos, sin = (_check_tensor(n, t) for n, t in zip(("cos", "sin"), rope, strict=True))
    code = _layout_code(layout)
    dim = _rotary_dim(rotary_dim, cos, head_dim)
    return cos, sin, code, dim


def _layout_code(layout: str) -> int:
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout={layout!r}; allowed: {sorted(ROPE_LAYOUTS)}")
    return rope_layout_code(layout)


def _rotary_dim(rotary_dim: int | None, cos: Tensor, head_dim: int) -> int:
    dim = cos.shape[-1] if rotary_dim is None else rotary_dim
    if dim <= 0 or dim % 2 or dim > head_dim or cos.shape[-1] != dim:
        raise ValueError(
            f"rotary_dim={dim} must be even, <= head dim {head_dim} and equal cos's last dim {cos.shape[-1]}"
        )
    return dim


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    attn_mask: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
    rope_layout: Literal["rotate_half", "interleaved"] = "rotate_half",
    rotary_dim: int | None = None,
    align: Literal["top_left", "bottom_right"] = "bottom_right",
    dropout_p: float = 0.0,
    config: TileConfig | None = None,
) -> Tensor:
    """softmax(scale·(RoPE(q)·RoPE(k)ᵀ) [softcap] [+ ALiBi] [+ mask]) · v on [B, H, N, D] tensors (GQA allowed).

    Any strides are accepted for every tensor argument. scale: any finite float (default 1/sqrt(D); 0 gives
    uniform attention over the kept keys). softcap: cap·tanh(scores/cap) with a finite cap > 0, or None.
    attn_mask: bool (True = attend) or a floating additive mask, broadcastable to [B, Hq, Nq, Nk] (an integer mask
    is a TypeError, as in F.scaled_dot_product_attention). Positions: query i sits at pos(i) = i + Nk - Nq with
    align="bottom_right", at i with "top_left"; causal keeps keys j <= pos(i). window keeps keys j with
    pos(i) - j < window, i.e. the `window` most recent positions up to pos(i); it limits only how far back a query
    looks, so combine it with causal=True for Mistral's sliding window (HF's `kv_idx > q_idx - sliding_window` and
    causal); without causal, later keys stay visible (FlashAttention's window_size=(window - 1, -1)). HF's
    bidirectional sliding window |i - j| <= w is not this: pass it as attn_mask. Fully masked rows give zeros.
    `config` fixes the forward kernel's tile
    configuration (block_m, block_n: powers of two >= 16; num_warps; num_stages) instead of the tuned or default
    one; it applies where the Triton kernels run (CUDA, or CPU under TRITON_INTERPRET=1).
    dropout_p drops each probability with that chance after the softmax (scaling the kept ones by 1/(1-p)); the
    keep mask is drawn from torch's generator on q's device, so `torch.manual_seed` makes it reproducible, and the
    backward drops the same probabilities.
    """
    _check_qkv(q, k, v)
    for name, t in (("attn_mask", attn_mask), ("alibi_slopes", alibi_slopes)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    _same_device(q=q, k=k, v=v, attn_mask=attn_mask, alibi_slopes=alibi_slopes)
    check_attention_mask(attn_mask, q.shape[:3], k.shape[2])
    scale = _check_scalars(scale, window, softcap, dropout_p, q.shape[-1])
    if align not in ("top_left", "bottom_right"):
        raise ValueError(f"align={align!r}; allowed: 'top_left', 'bottom_right'")
    cos, sin, layout, dim = _rope_args(rope, rope_layout, rotary_dim, q.shape[-1])
    _check_config(config)
    rng = dropout_rng(q.device) if dropout_p > 0 else None
    inputs = AttnInputs(q, k, v, attn_mask, alibi_slopes, cos, sin, rng)
    bottom_right = align == "bottom_right"
    flags = AttnFlags(scale, causal, bottom_right, window or 0, softcap or 0.0, layout, dim, float(dropout_p))
    with launch_config(config):
        out, _ = ATTENTION.overload(*ATTENTION.call_args(inputs, flags))
    return out


def _check_scalars(
    scale: float | None, window: int | None, softcap: float | None, dropout_p: float, head_dim: int
) -> float:
    """The scale to use (given, or 1/sqrt(head_dim) when None: never `scale or default`, 0.0 is a scale), after
    checking every scalar argument of attention."""
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale}")
    if not 0.0 <= dropout_p < 1.0:  # also refuses NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window must be a positive int number of keys or None, got {window!r}")
    if softcap is not None and not (0.0 < softcap < math.inf):  # inf would give inf·tanh(0) = NaN, not "no cap"
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap}")
    return scale


def _check_config(config: object) -> None:
    if config is None:
        return
    if not isinstance(config, TileConfig):
        raise TypeError(f"config must be a tilefuse TileConfig or None, got {type(config).__name__}")
    for name in ("block_m", "block_n"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"config.{name} must be a power of two >= 16, got {value}")
    if config.num_warps not in (1, 2, 4, 8, 16) or config.num_stages < 1:
        raise ValueError(f"config.num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1, got {config}")


def dropout_rng(device: torch.device | str) -> Tensor:
    """An int64 [seed, offset] for the attention dropout's counter-based RNG, drawn from torch's generator."""
    return torch.randint(0, RNG_HIGH, (2,), dtype=torch.int64, device=device)


def _check_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float) -> None:
    _check_tensor("x", x)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (_check_tensor(name, p).shape != x.shape[-1:]):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},), got {tuple(p.shape)}")
    if residual is not None and _check_tensor("residual", residual).shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    _same_device(x=x, weight=weight, bias=bias, residual=residual)


def rms_norm(
    x: Tensor, weight: Tensor | None, eps: float = 1e-6, residual: Tensor | None = None, weight_offset: float = 0.0
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last axis; with `residual`, returns (rms_norm(x + residual), x + residual)."""
    return _norm(True, {"x": x, "residual": residual, "weight": weight, "eps": eps, "weight_offset": weight_offset})


def layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last axis; with `residual`, returns (layer_norm(x + residual), x + residual)."""
    return _norm(False, {"x": x, "residual": residual, "weight": weight, "bias": bias, "eps": eps})


def _norm(rms: bool, args: dict[str, Any]) -> Tensor | tuple[Tensor, Tensor]:
    """Check a norm's arguments, then call the op they ask for (add_*: with a residual) with them by name."""
    _check_norm(args["x"], args["weight"], args.get("bias"), args["residual"], args["eps"])
    op = norm_op(rms, residual=args["residual"] is not None)
    return op.overload(*op.call_args(**{name: value for name, value in args.items() if name in op.names}))


def apply_rope(
    x: Tensor, cos: Tensor, sin: Tensor, layout: Literal["rotate_half", "interleaved"] = "rotate_half",
    rotary_dim: int | None = None,
) -> Tensor:  # fmt: skip
    """Rotate the first `rotary_dim` features of x (default: cos's last dim); cos/sin broadcast against x."""
    _check_tensor("x", x)
    _check_tensor("cos", cos)
    _check_tensor("sin", sin)
    _same_device(x=x, cos=cos, sin=sin)
    if cos.shape != sin.shape:
        raise ValueError(f"cos shape {tuple(cos.shape)} != sin shape {tuple(sin.shape)}")
    code, dim = _layout_code(layout), _rotary_dim(rotary_dim, cos, x.shape[-1])
    return ROPE.overload(*ROPE.call_args(x=x, cos=cos, sin=sin, layout=code, rotary_dim=dim))
