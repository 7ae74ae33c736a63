"""Attention forward and forward+backward: tilefuse vs SDPA, FlexAttention, torch.compile'd eager and eager.

TFLOP/s count only the (query, key) pairs causal/window keep (4·pairs·D per head forward, 3.5x that for
forward+backward). GPU shapes keep batch·N = 16k tokens and heads·D = 2048, the FlashAttention benchmark setup.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

from .attention_contenders import CONTENDERS, builders
from .attention_impls import AttnProblem, make_inputs, reference
from .harness import TOLERANCE, Case, Context, Record, run_case

NAME = "attention"
METRIC = "tflops"
X_AXIS = "kv_len"
log = logging.getLogger("tilefuse.benchmarks")

VARIANTS = ("full", "causal", "gqa", "window", "softcap", "alibi", "rope")
_SHORT = {"bfloat16": "bf16", "float16": "fp16"}


def problem(variant: str, dtype: str, head_dim: int, seq: int, tiny: bool) -> AttnProblem:
    heads = 2 if tiny else 2048 // head_dim
    batch = 1 if tiny else max(1, 16384 // seq)
    p = AttnProblem(batch, heads, heads, seq, seq, head_dim, dtype, causal=variant != "full")
    extras: dict[str, dict[str, Any]] = {
        "gqa": {"kv_heads": max(1, heads // 4) if not tiny else 1},
        "window": {"window": max(16, min(seq // 4, 4096))},
        "softcap": {"softcap": 50.0},
        "alibi": {"alibi": True},
        "rope": {"rope": True},
    }
    extra = extras.get(variant, {})
    return dataclasses.replace(p, **extra)


def grid(ctx: Context, full_grid: bool) -> Iterator[tuple[str, bool, str, int, int]]:
    """(variant, backward, dtype, head_dim, N) of every case, in run order."""
    if ctx.tiny:
        core = [(dt, 64, 64) for dt in ("bfloat16", "float16")]
        variant_points = [("bfloat16", 64, 64)]
    else:
        seqs = (512, 1024, 2048, 4096, 8192, 16384)
        core = [("bfloat16", 128, n) for n in seqs]
        core += [(dt, d, n) for dt, d in (("float16", 128), ("bfloat16", 64)) for n in (2048, 8192)]
        if full_grid:
            core = [(dt, d, n) for dt in ("bfloat16", "float16") for d in (64, 128) for n in seqs]
        variant_points = [("bfloat16", 128, n) for n in (2048, 8192)]
    for backward in (False, True):
        for dtype, head_dim, seq in core:
            for variant in ("full", "causal"):
                yield variant, backward, dtype, head_dim, seq
        for dtype, head_dim, seq in variant_points:
            for variant in VARIANTS[2:]:
                yield variant, backward, dtype, head_dim, seq


def case_name(variant: str, backward: bool, dtype: str, head_dim: int, seq: int) -> str:
    return f"{'fwd+bwd' if backward else 'fwd'} {_SHORT[dtype]} d{head_dim} N{seq} {variant}"


def make_case(name: str, p: AttnProblem, backward: bool, variant: str, ctx: Context) -> Case:
    x = make_inputs(p, ctx.device, grad=backward)
    mode = "fwd+bwd" if backward else "fwd"
    series = f"{mode} {_SHORT[p.dtype]} d{p.head_dim} {variant}"
    params = {**p.params(), "variant": variant, "mode": mode, "series": series}
    return Case(
        name=name,
        params=params,
        reference=partial(reference, p, x, backward),
        contenders=builders(p, x, backward, (*CONTENDERS, "tilefuse_prepass") if p.rope else CONTENDERS),
        tolerance=TOLERANCE[p.torch_dtype] * (2 if backward else 1),
        work={"flops": p.flops(backward)},
    )


def run(ctx: Context, full_grid: bool = False) -> list[Record]:
    records: list[Record] = []
    for variant, backward, dtype, head_dim, seq in grid(ctx, full_grid):
        name = case_name(variant, backward, dtype, head_dim, seq)
        if not ctx.selected(name):
            continue
        log.info("attention: %s", name)
        p = problem(variant, dtype, head_dim, seq, ctx.tiny)
        records += run_case(NAME, make_case(name, p, backward, variant, ctx), ctx)
    return records
