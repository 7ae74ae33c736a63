"""One attention problem and every way to compute it: tilefuse, SDPA, FlexAttention, torch.compile'd eager, eager,
and the high-precision reference the others are checked against. Shared by the attention and decode suites.

Conventions follow `tilefuse.ops.attention`: query i sits at position i + (kv_len - q_len) (bottom-right
alignment); causal keeps keys j <= pos, a window keeps pos - j < window; ALiBi adds slope·(j - pos) after the
softcap; RoPE (rotate-half, cos/sin [N, D] in the input dtype) rotates q and k before the scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]
_REFERENCE_CHUNK_BYTES = 2**30  # scores held at once by the chunked reference


@dataclass(frozen=True)
class AttnProblem:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = False
    window: int | None = None
    softcap: float | None = None
    alibi: bool = False
    rope: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def kept_pairs(self) -> int:
        """(query, key) pairs per head that causal/window keep: the FLOPs are counted on these only."""
        total = 0
        for i in range(self.q_len):
            pos = i + self.offset
            hi = min(self.kv_len, pos + 1) if self.causal or self.window else self.kv_len
            lo = max(0, pos - self.window + 1) if self.window else 0
            total += max(0, hi - lo)
        return total

    def flops(self, backward: bool) -> float:
        """2 matmuls forward (4·pairs·D per head); the backward has 5 (2.5x), the FlashAttention convention."""
        forward = 4.0 * self.batch * self.q_heads * self.kept_pairs() * self.head_dim
        return forward * 3.5 if backward else forward

    def io_bytes(self) -> float:
        """Compulsory HBM bytes: read Q, K, V once and write O once (the decode suite's GB/s)."""
        size = torch.empty((), dtype=self.torch_dtype).element_size()
        q_o = 2 * self.batch * self.q_heads * self.q_len * self.head_dim
        k_v = 2 * self.batch * self.kv_heads * self.kv_len * self.head_dim
        return float((q_o + k_v) * size)


@dataclass
class AttnInputs:
    q: Tensor
    k: Tensor
    v: Tensor
    cos: Tensor | None
    sin: Tensor | None
    slopes: Tensor | None
    grad_out: Tensor | None


def make_inputs(p: AttnProblem, device: torch.device, grad: bool, seed: int = 0) -> AttnInputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=p.torch_dtype).requires_grad_(grad)

    q = randn(p.batch, p.q_heads, p.q_len, p.head_dim)
    k = randn(p.batch, p.kv_heads, p.kv_len, p.head_dim)
    v = randn(p.batch, p.kv_heads, p.kv_len, p.head_dim)
    cos = sin = slopes = grad_out = None
    if p.rope:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, p.head_dim, 2, dtype=torch.float64) / p.head_dim)
        angles = torch.outer(torch.arange(p.kv_len, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = (t.to(device=device, dtype=p.torch_dtype) for t in (angles.cos(), angles.sin()))
    if p.alibi:
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / p.q_heads) for h in range(p.q_heads)], device=device)
    if grad:
        grad_out = torch.randn(p.batch, p.q_heads, p.q_len, p.head_dim, generator=gen).to(device, p.torch_dtype)
    return AttnInputs(q, k, v, cos, sin, slopes, grad_out)


# ----------------------------------------------------------------------------------------------- eager math
def rope_rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def keep_mask(p: AttnProblem, rows: range, device: torch.device) -> Tensor | None:
    """Boolean [len(rows), kv_len] of kept pairs for causal/window, None when every pair is kept."""
    if not p.causal and not p.window:
        return None
    pos = torch.arange(rows.start, rows.stop, device=device).unsqueeze(-1) + p.offset
    key = torch.arange(p.kv_len, device=device).unsqueeze(0)
    keep = key <= pos
    if p.window:
        keep &= (pos - key) < p.window
    return keep


def alibi_bias(p: AttnProblem, slopes: Tensor, rows: range, dtype: torch.dtype) -> Tensor:
    pos = torch.arange(rows.start, rows.stop, device=slopes.device).unsqueeze(-1) + p.offset
    rel = (torch.arange(p.kv_len, device=slopes.device).unsqueeze(0) - pos).to(dtype)
    return slopes.to(dtype).view(-1, 1, 1) * rel


def _core(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, p: AttnProblem, rows: range) -> Tensor:
    """Attention of already-rotated q rows `rows` against all keys, HF-style (softmax in fp32 at least)."""
    group = p.q_heads // p.kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * p.scale
    if p.softcap:
        scores = torch.tanh(scores / p.softcap) * p.softcap
    if slopes is not None:
        scores = scores + alibi_bias(p, slopes, rows, scores.dtype)
    keep = keep_mask(p, rows, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def eager_attention(p: AttnProblem, x: AttnInputs) -> AttnFn:
    """The eager contender: what a model's attention module computes, unfused."""

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if x.cos is not None and x.sin is not None:
            q = rope_rotate_half(q, x.cos[-p.q_len :], x.sin[-p.q_len :])
            k = rope_rotate_half(k, x.cos, x.sin)
        return _core(q, k, v, x.slopes, p, range(p.q_len))

    return attention


def reference(p: AttnProblem, x: AttnInputs, backward: bool) -> tuple[Tensor, ...]:
    """fp64 (CPU) or fp32 (CUDA) attention, chunked over query rows (checkpointed when `backward`)."""
    ct = torch.float64 if x.q.device.type == "cpu" else torch.float32
    q, k, v = (t.detach().to(ct).requires_grad_(backward) for t in (x.q, x.k, x.v))
    with torch.set_grad_enabled(backward):
        qr, kr = q, k
        if x.cos is not None and x.sin is not None:
            cos, sin = x.cos.to(ct), x.sin.to(ct)
            qr, kr = rope_rotate_half(q, cos[-p.q_len :], sin[-p.q_len :]), rope_rotate_half(k, cos, sin)
        rows_per_chunk = max(1, _REFERENCE_CHUNK_BYTES // (p.batch * p.q_heads * p.kv_len * 8))
        chunks = []
        for start in range(0, p.q_len, rows_per_chunk):
            rows = range(start, min(start + rows_per_chunk, p.q_len))
            part = partial(_core, slopes=x.slopes, p=p, rows=rows)
            q_rows = qr[:, :, rows.start : rows.stop]
            chunks.append(checkpoint(part, q_rows, kr, v, use_reentrant=False) if backward else part(q_rows, kr, v))
        out = torch.cat(chunks, dim=2)
        if not backward:
            return (out,)
        assert x.grad_out is not None
        grads = torch.autograd.grad(out, (q, k, v), x.grad_out.to(ct))
    return (out.detach(), *grads)
