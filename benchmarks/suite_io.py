"""HBM traffic over a shape grid (no kernel runs, CPU is enough): bytes the fused kernel moves (its TiledPlan),
the unfused graph's estimate, and the attention I/O lower bound (see codegen/io_report.py and codegen/plan.py)."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from tilefuse.codegen.io_report import site_io
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec

from .harness import Context, Record

NAME = "io"
METRIC = "unfused_over_fused"
X_AXIS = "size"  # attention: N; norms: hidden width
log = logging.getLogger("tilefuse.benchmarks")
Spec = AttentionSpec | NormSpec | RopeSpec


def attention_specs(ctx: Context) -> list[tuple[str, AttentionSpec]]:
    seqs = (128, 512, 2048) if ctx.tiny else (512, 1024, 2048, 4096, 8192, 16384)
    specs = []
    for head_dim in (64, 128):
        heads = 2048 // head_dim
        for seq in seqs:
            base = AttentionSpec(1, heads, heads, seq, seq, head_dim, head_dim, "bfloat16", 1 / math.sqrt(head_dim))
            variants: dict[str, dict[str, Any]] = {
                "full": {},
                "causal": {"causal": True},
                "gqa": {"causal": True, "kv_heads": heads // 4, "gqa_group": 4},
                "window": {"causal": True, "window": max(16, seq // 4)},
            }
            for variant, fields in variants.items():
                spec = dataclasses.replace(base, **fields)
                specs.append((f"attention bf16 d{head_dim} N{seq} {variant}", spec))
    return specs


def norm_specs(ctx: Context) -> list[tuple[str, Spec]]:
    rows, hiddens = (256, (256, 1024)) if ctx.tiny else (16384, (2048, 4096, 8192))
    specs: list[tuple[str, Spec]] = []
    for hidden in hiddens:
        for norm in ("rmsnorm", "layernorm"):
            for residual in (False, True):
                spec = NormSpec(norm, hidden, (rows, hidden), "bfloat16", 1e-6, has_bias=norm == "layernorm",
                                residual=residual, out_dtype="bfloat16")  # fmt: skip
                specs.append((f"{norm}{'+residual' if residual else ''} {rows}x{hidden}", spec))
    shape = (1, 4, 128, 64) if ctx.tiny else (4, 32, 4096, 128)
    specs.append(
        (f"rope {'x'.join(map(str, shape))}", RopeSpec("rotate_half", shape[-1], shape[-1], shape, "bfloat16"))
    )
    return specs


def _record(name: str, spec: Spec) -> Record:
    io = site_io(name, spec)
    metrics: dict[str, float | None] = {
        "fused_bytes": float(io.fused_bytes),
        "unfused_bytes": float(io.unfused_bytes) if io.unfused_bytes is not None else None,
        "lower_bound_bytes": float(io.lower_bound_bytes) if io.lower_bound_bytes is not None else None,
        "unfused_over_fused": io.unfused_bytes / io.fused_bytes if io.unfused_bytes else None,
        "fused_over_bound": io.fused_bytes / io.lower_bound_bytes if io.lower_bound_bytes else None,
    }
    params = spec.to_dict()
    params["size"] = params.get("q_len") or params.get("width")
    params["series"] = name.split(" N")[0] + " " + name.split()[-1] if spec.kind == "attention" else name.split()[0]
    return Record(NAME, name, params, "tilefuse", "ok", timing="analytic (TiledPlan)", metrics=metrics)


def run(ctx: Context) -> list[Record]:
    records = []
    for name, spec in [*attention_specs(ctx), *norm_specs(ctx)]:
        if not ctx.selected(name):
            continue
        try:
            records.append(_record(name, spec))
        except Exception as err:  # a plan the codegen cannot build yet is a result too
            records.append(Record(NAME, name, spec.to_dict(), "tilefuse", "error", f"{type(err).__name__}: {err}"))
    log.info("io: %d sites", len(records))
    return records
