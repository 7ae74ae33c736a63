"""Decode attention: 1 or 4 new queries against a long KV cache (GQA 32/8, D 128 on GPU): tilefuse vs SDPA vs
FlexAttention. Memory-bound, so GB/s of the compulsory traffic (read K, V, Q once, write O) is the metric."""

from __future__ import annotations

import logging
from functools import partial

from .attention_contenders import builders
from .attention_impls import AttnProblem, make_inputs, reference
from .harness import TOLERANCE, Case, Context, Record, run_case

NAME = "decode"
METRIC = "gbps"
X_AXIS = "kv_len"
CONTENDERS = ("tilefuse", "sdpa", "flex")
log = logging.getLogger("tilefuse.benchmarks")


def problems(ctx: Context) -> list[AttnProblem]:
    if ctx.tiny:
        shape: tuple[int, ...] = (1, 4, 2, 64)
        kv_lens: tuple[int, ...] = (64, 256)
    else:
        shape, kv_lens = (4, 32, 8, 128), (1024, 4096, 16384, 65536, 131072)
    batch, q_heads, kv_heads, head_dim = shape
    return [
        AttnProblem(batch, q_heads, kv_heads, q_len, kv_len, head_dim, "bfloat16", causal=True)
        for q_len in (1, 4)
        for kv_len in kv_lens
    ]


def run(ctx: Context) -> list[Record]:
    records: list[Record] = []
    for p in problems(ctx):
        name = f"decode bf16 d{p.head_dim} q{p.q_len} kv{p.kv_len}"
        if not ctx.selected(name):
            continue
        log.info("decode: %s", name)
        x = make_inputs(p, ctx.device, grad=False)
        case = Case(
            name=name,
            params={**p.params(), "mode": "fwd", "series": f"q_len {p.q_len}"},
            reference=partial(reference, p, x, False),
            contenders=builders(p, x, False, CONTENDERS),
            tolerance=TOLERANCE[p.torch_dtype],
            work={"bytes": p.io_bytes(), "flops": p.flops(backward=False)},
        )
        records += run_case(NAME, case, ctx)
    return records
