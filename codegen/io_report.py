"""Per-site HBM traffic: what the fused kernel moves (its TiledPlan), what the unfused graph moves, and the I/O
lower bound of attention — the numbers behind "IO-aware".

The unfused estimate is deliberately generous to the unfused graph: every materialized tensor is written once
and read once by its consumer, the scale/mask/softmax chain counts as a single elementwise pass, and GQA
repeats of K/V are not counted. Real eager graphs move more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..specs import AttentionSpec, NormSpec, RopeSpec
from .families import default_config
from .families.attention import shape_free_default
from .plan import TiledPlan, io_lower_bound_bytes, itemsize


@dataclass(frozen=True)
class SiteIO:
    node: str
    kind: str
    fused_bytes: int
    unfused_bytes: int | None
    lower_bound_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _attention_unfused_bytes(spec: AttentionSpec) -> int:
    es = itemsize(spec.dtype)
    b, hq, hk = int(spec.batch or 0), int(spec.q_heads or 0), int(spec.kv_heads or 0)
    nq, nk, d, dv = int(spec.q_len or 0), int(spec.kv_len or 0), spec.head_dim, spec.v_head_dim
    q, k, v, out = b * hq * nq * d, b * hk * nk * d, b * hk * nk * dv, b * hq * nq * dv
    scores = b * hq * nq * nk
    mask = 0
    if spec.mask != "none":
        mask_elems = 1
        for dim in spec.mask_shape:
            mask_elems *= int(dim or 1)
        mask = mask_elems * (1 if spec.mask in ("boolean", "key_padding") else es)
    # Q·Kᵀ writes S; one pass reads S (+ mask) and writes P; P·V reads P and V and writes O.
    return (q + k + scores) * es + (scores * es + mask + scores * es) + (scores + v + out) * es


def _norm_unfused_bytes(spec: NormSpec) -> int:
    elems = 1
    for dim in spec.shape:
        elems *= int(dim or 1)
    # HF-style chain: upcast, square, mean (reads), scale, weight: >= 3 full read+write passes in fp32.
    return 3 * 2 * elems * 4 + (2 * elems * itemsize(spec.dtype) if spec.residual else 0)


def site_io(node: str, spec: AttentionSpec | NormSpec | RopeSpec) -> SiteIO:
    """Fused vs unfused bytes of one site (shapes must be static)."""
    if isinstance(spec, AttentionSpec):
        plan = TiledPlan(spec, shape_free_default(spec))  # the FA2 forward's default, whichever kernel runs
        fused = plan.hbm_read_bytes + plan.hbm_write_bytes
        bound = io_lower_bound_bytes(spec, plan.sram_bytes)
        return SiteIO(node, "attention", fused, _attention_unfused_bytes(spec), bound)
    plan = TiledPlan(spec, default_config(spec))  # the norm row block decides whether rows run in chunks
    fused = plan.hbm_read_bytes + plan.hbm_write_bytes
    unfused = _norm_unfused_bytes(spec) if isinstance(spec, NormSpec) else None
    return SiteIO(node, spec.kind, fused, unfused, None)


def io_report(sites: list[Any]) -> list[SiteIO]:
    """SiteIO for every fused site of a FusionReport (`report.sites`); sites with dynamic shapes are skipped."""
    rows = []
    for site in sites:
        if site.status != "fused" or site.spec is None or site.detail.get("fused_into"):
            continue  # a RoPE absorbed into attention moves no bytes of its own
        try:
            rows.append(site_io(site.node, site.spec))
        except ValueError:  # a dynamic dimension: no byte count without a concrete shape
            continue
    return rows
