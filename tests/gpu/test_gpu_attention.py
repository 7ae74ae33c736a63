"""tilefuse.ops.attention forward and backward on the GPU: every feature against the fp64 golden and eager torch.

A covering design, not the cross product, since each distinct variant costs four kernel compiles and the GPU run has
minutes: every feature appears (softcap rides on the GQA 4:1 case, ALiBi on the sliding window; each feature alone is
tested under the interpreter in tests/codegen), bf16/fp16 and both head dims are spread over the cases, and two cases
reuse compiled kernels (key padding the bool mask's, the [B, N, H, D] strided views bottom-right causal's).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pytest
import torch
from _kernel_watch import KernelWatch
from _numerics import check_against_golden, eager_attention
from _profile import DEVICE, PROFILE
from torch import Tensor

from tilefuse import ops
from tilefuse.codegen import reference as ref

BF16, FP16 = torch.bfloat16, torch.float16
S = PROFILE.seq
D_SMALL, D_LARGE = PROFILE.head_dims
FORWARD = "attention_fwd_kernel"
BACKWARD = ("attention_bwd_preprocess_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")


class Case(NamedTuple):
    name: str
    dtype: torch.dtype
    head_dim: int
    nq: int
    nk: int
    group: int  # q heads per kv head
    options: dict[str, Any]  # tilefuse.ops.attention keywords that need no tensor
    extra: str = ""  # a tensor argument or layout: alibi, additive_mask, bool_mask, key_padding, rope, bnhd


CAUSAL_BR = {"causal": True, "align": "bottom_right"}
CAUSAL_TL = {"causal": True, "align": "top_left"}
CASES = [
    Case("full", BF16, D_SMALL, S, S, 1, {}),
    Case("gqa4_causal_top_left_softcap", FP16, D_LARGE, S, S + S // 2, 4, {**CAUSAL_TL, "softcap": 2.0}),
    Case("causal_bottom_right", BF16, D_LARGE, S // 2, S + S // 2, 1, CAUSAL_BR),
    Case("strided_bnhd", BF16, D_LARGE, S // 2, S + S // 2, 1, CAUSAL_BR, "bnhd"),
    Case("sliding_window_alibi", FP16, D_SMALL, S, S, 2, {"causal": True, "window": 3 * S // 8}, "alibi"),
    Case("rope_rotate_half", BF16, D_SMALL, S, S, 2, {"causal": True}, "rope"),
    Case("additive_mask", FP16, D_SMALL, S, S + S // 2, 1, {}, "additive_mask"),
    Case("bool_mask", BF16, D_LARGE, S, S, 2, {}, "bool_mask"),
    Case("key_padding", BF16, D_LARGE, S, S, 2, {}, "key_padding"),
]


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)


def rope_tables(n: int, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[n, dim] cos/sin of the standard rotate-half RoPE (base 10000), rounded to dtype as a model holds them."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=DEVICE, dtype=torch.float32) / dim)
    freqs = torch.outer(torch.arange(n, device=DEVICE, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _bool_mask(gen: torch.Generator, batch: int, heads: int, nq: int, nk: int) -> Tensor:
    """Random keep mask with key 0 always kept, and batch 0 blind to the second half of the keys (whole tiles
    masked, which the kernels skip)."""
    mask = torch.rand(batch, heads, nq, nk, generator=gen, device=DEVICE) > 0.3
    mask[..., 0] = True
    mask[0, :, :, nk // 2 :] = False
    return mask


def _extra_kwargs(case: Case, gen: torch.Generator, heads: int) -> dict[str, Any]:
    batch, nq, nk = PROFILE.batch, case.nq, case.nk
    if case.extra == "alibi":
        return {"alibi_slopes": 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=DEVICE) / heads)}
    if case.extra == "rope":
        return {"rope": rope_tables(nq, case.head_dim, case.dtype)}
    if case.extra == "additive_mask":
        return {"attn_mask": _randn(gen, batch, 1, nq, nk, dtype=case.dtype)}
    if case.extra == "bool_mask":
        return {"attn_mask": _bool_mask(gen, batch, heads, nq, nk)}
    if case.extra == "key_padding":
        padding = torch.ones(batch, 1, 1, nk, dtype=torch.bool, device=DEVICE)
        padding[-1, ..., nk - nk // 4 :] = False
        return {"attn_mask": padding}
    return {}


def attention_inputs(case: Case, seed: int = 0) -> tuple[tuple[Tensor, Tensor, Tensor], dict[str, Any]]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    kv_heads = PROFILE.kv_heads
    heads = kv_heads * case.group
    shapes = [(heads, case.nq), (kv_heads, case.nk), (kv_heads, case.nk)]
    if case.extra == "bnhd":  # views of [B, N, H, D] buffers, as a model's projections produce them
        qkv = [_randn(gen, PROFILE.batch, n, h, case.head_dim, dtype=case.dtype).transpose(1, 2) for h, n in shapes]
        assert not any(t.is_contiguous() for t in qkv)
    else:
        qkv = [_randn(gen, PROFILE.batch, h, n, case.head_dim, dtype=case.dtype) for h, n in shapes]
    return (qkv[0], qkv[1], qkv[2]), {**case.options, **_extra_kwargs(case, gen, heads)}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_attention_forward_backward_match_golden(case: Case, kernels: KernelWatch) -> None:
    qkv, kwargs = attention_inputs(case)
    check_against_golden(ops.attention, eager_attention, qkv, kwargs, (["out"], "qkv"))
    kernels.assert_ran(FORWARD, *BACKWARD)


# -------------------------------------------------------------------------------------------------- dropout
DROPOUT_P = 0.2
DROPOUT_SEED = 11
DROPOUT_N = D_LARGE  # v = identity needs head dim == kv length


def test_dropout_is_seeded_and_keeps_the_reference_mask(kernels: KernelWatch) -> None:
    """q = k = 0 makes P = 1/N and v = I makes the output the dropped P itself: kept where the kernel kept. The
    mask must be reference.dropout_keep of the rng ops.attention drew, the kept fraction 1 - p, the mean kept."""
    batch, kv_heads, n = PROFILE.batch, PROFILE.kv_heads, DROPOUT_N
    q = torch.zeros(batch, 2 * kv_heads, n, n, dtype=FP16, device=DEVICE)
    k = torch.zeros(batch, kv_heads, n, n, dtype=FP16, device=DEVICE)
    v = torch.eye(n, dtype=FP16, device=DEVICE).expand(batch, kv_heads, n, n).contiguous()
    runs = []
    for seed in (DROPOUT_SEED, DROPOUT_SEED, DROPOUT_SEED + 1):
        torch.manual_seed(seed)
        runs.append(ops.attention(q, k, v, dropout_p=DROPOUT_P))
    assert torch.equal(runs[0], runs[1]), "same seed, different dropout"
    assert not torch.equal(runs[0], runs[2]), "another seed, same dropout"
    torch.manual_seed(DROPOUT_SEED)
    rng = ops.dropout_rng(DEVICE)
    kept = runs[0] != 0
    assert torch.equal(kept, ref.dropout_keep(rng, tuple(kept.shape), DROPOUT_P)), "kernel mask != dropout_keep"
    draws = kept.numel()
    assert abs(kept.float().mean().item() - (1 - DROPOUT_P)) < 5 * math.sqrt(DROPOUT_P * (1 - DROPOUT_P) / draws)
    mean = runs[0].float().mean().item() * n  # E[out] = P = 1/n
    assert abs(mean - 1.0) < 0.05, mean
    kernels.assert_ran(FORWARD)


def _seeded_dropout_attention(q: Tensor, k: Tensor, v: Tensor, *, dropout: tuple[Tensor, float], **kw: Any) -> Tensor:
    """ops.attention drawing the rng `dropout`'s keep mask was made from."""
    torch.manual_seed(DROPOUT_SEED)
    return ops.attention(q, k, v, dropout_p=dropout[1], **kw)


def test_dropout_forward_backward_match_golden_with_the_same_mask(kernels: KernelWatch) -> None:
    """Forward and backward drop the same probabilities: eager and golden apply that keep mask explicitly."""
    case = Case("dropout", FP16, D_LARGE, DROPOUT_N, DROPOUT_N, 2, {})  # the kernel of the test above
    qkv, kwargs = attention_inputs(case, seed=3)
    torch.manual_seed(DROPOUT_SEED)
    rng = ops.dropout_rng(DEVICE)
    keep = ref.dropout_keep(rng, (PROFILE.batch, qkv[0].shape[1], case.nq, case.nk), DROPOUT_P)
    kwargs["dropout"] = (keep, DROPOUT_P)
    (out,), _ = check_against_golden(_seeded_dropout_attention, eager_attention, qkv, kwargs, (["out"], "qkv"))
    kwargs.pop("dropout")
    assert (out - ops.attention(*qkv, **kwargs)).abs().max().item() > 0.1, "dropout dropped nothing"
    kernels.assert_ran(FORWARD, *BACKWARD)
