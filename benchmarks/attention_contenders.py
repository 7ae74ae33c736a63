"""Attention contenders as harness builders: each returns a runner (forward, or forward + backward returning
(out, dq, dk, dv)) or raises Unavailable with the reason."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_impls import AttnFn, AttnInputs, AttnProblem, alibi_bias, eager_attention, keep_mask, rope_rotate_half
from .harness import Runner, Unavailable

CONTENDERS = ("tilefuse", "sdpa", "flex", "compile", "eager")


def _runner(fn: AttnFn, x: AttnInputs, backward: bool) -> Runner:
    if not backward:
        return partial(fn, x.q, x.k, x.v)
    inputs = (x.q, x.k, x.v)

    def forward_backward() -> tuple[Tensor, ...]:
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, x.grad_out))

    return forward_backward


def _rope(p: AttnProblem, x: AttnInputs, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    if x.cos is None or x.sin is None:
        return q, k
    return rope_rotate_half(q, x.cos[-p.q_len :], x.sin[-p.q_len :]), rope_rotate_half(k, x.cos, x.sin)


def tilefuse_attention(p: AttnProblem, x: AttnInputs, backward: bool) -> Runner:
    from tilefuse import ops

    rope = (x.cos, x.sin) if x.cos is not None and x.sin is not None else None

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ops.attention(
            q, k, v, causal=p.causal, scale=p.scale, window=p.window, softcap=p.softcap, alibi_slopes=x.slopes,
            rope=rope,
        )  # fmt: skip

    return _runner(attention, x, backward)


def tilefuse_rope_prepass(p: AttnProblem, x: AttnInputs, backward: bool) -> Runner:
    """tilefuse with RoPE as passes of its own (`ops.apply_rope` on q and k, then attention without RoPE): the
    alternative to rotating every K tile as it is loaded (once per query block), timed beside it so the launcher's
    choice between the two can rest on a measurement."""
    from tilefuse import ops

    if x.cos is None or x.sin is None:
        raise Unavailable("no RoPE in this case")
    cos, sin = x.cos, x.sin

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = ops.apply_rope(q, cos[-p.q_len :], sin[-p.q_len :]), ops.apply_rope(k, cos, sin)
        return ops.attention(
            q, k, v, causal=p.causal, scale=p.scale, window=p.window, softcap=p.softcap, alibi_slopes=x.slopes
        )

    return _runner(attention, x, backward)


def _sdpa_mask(p: AttnProblem, x: AttnInputs) -> tuple[Tensor | None, bool]:
    """SDPA's attn_mask / is_causal equivalent to the problem (is_causal is top-left aligned, so only for Nq == Nk)."""
    rows = range(p.q_len)
    keep = keep_mask(p, rows, x.q.device)
    if keep is not None and bool(keep.all()):
        keep = None
    if x.slopes is not None:
        bias = alibi_bias(p, x.slopes, rows, torch.float32)
        if keep is not None:
            bias = bias.masked_fill(~keep, float("-inf"))
        return bias.to(p.torch_dtype).unsqueeze(0), False
    if p.causal and not p.window and p.offset == 0:
        return None, True
    return keep, False


def sdpa_attention(p: AttnProblem, x: AttnInputs, backward: bool) -> Runner:
    if p.softcap:
        raise Unavailable("SDPA has no logit softcap")
    mask, is_causal = _sdpa_mask(p, x)
    gqa = p.q_heads != p.kv_heads

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = _rope(p, x, q, k)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=p.scale, enable_gqa=gqa
        )

    return _runner(attention, x, backward)


def _flex_mods(p: AttnProblem, x: AttnInputs) -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
    cap, slopes, offset, window = p.softcap, x.slopes, p.offset, p.window
    score_mod = mask_mod = None
    if cap or slopes is not None:

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            if cap:
                score = torch.tanh(score / cap) * cap
            if slopes is not None:
                score = score + slopes[h] * (kv_idx - q_idx - offset)
            return score

    if p.causal or window:

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            pos = q_idx + offset
            keep = kv_idx <= pos
            return keep & (pos - kv_idx < window) if window else keep

    return score_mod, mask_mod


def flex_attention(p: AttnProblem, x: AttnInputs, backward: bool) -> Runner:
    """torch.compile'd flex_attention with the equivalent score_mod / block mask (and RoPE in the same graph)."""
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError as err:
        raise Unavailable(f"torch.nn.attention.flex_attention is not importable: {err}") from err
    if backward and x.q.device.type == "cpu":
        raise Unavailable("FlexAttention has no backward on CPU")
    score_mod, mask_mod = _flex_mods(p, x)
    block_mask = None
    if mask_mod is not None:
        block_mask = flex.create_block_mask(mask_mod, None, None, p.q_len, p.kv_len, device=str(x.q.device))
    gqa = p.q_heads != p.kv_heads

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = _rope(p, x, q, k)
        out = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=p.scale, enable_gqa=gqa)
        assert isinstance(out, Tensor)
        return out

    return _runner(torch.compile(attention, dynamic=False), x, backward)


def compiled_attention(p: AttnProblem, x: AttnInputs, backward: bool) -> Runner:
    return _runner(torch.compile(eager_attention(p, x), dynamic=False), x, backward)


def plain_eager_attention(p: AttnProblem, x: AttnInputs, backward: bool) -> Runner:
    return _runner(eager_attention(p, x), x, backward)


BUILDERS: dict[str, Callable[[AttnProblem, AttnInputs, bool], Runner]] = {
    "tilefuse": tilefuse_attention,
    "tilefuse_prepass": tilefuse_rope_prepass,  # RoPE cases only (suite_attention adds it)
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "compile": compiled_attention,
    "eager": plain_eager_attention,
}


def builders(p: AttnProblem, x: AttnInputs, backward: bool, names: tuple[str, ...]) -> dict[str, Callable[[], Runner]]:
    return {name: partial(BUILDERS[name], p, x, backward) for name in names}
