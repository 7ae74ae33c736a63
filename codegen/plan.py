"""TiledPlan: a Spec plus a tile config, and what that pair costs — grid, loop structure, HBM bytes, SRAM, FLOPs.

The plan is a facade over the kernel family records (`codegen/families/`): it resolves the family and every term
comes from the record, which mirrors its launcher exactly (it reuses the launchers' block-size helpers, so a tile
the launcher clamps is clamped here too); `tests/codegen/test_plan.py` checks the byte counts against what the
kernels really load and store under the interpreter (`codegen/io_count.py`).

Byte convention (all families): a byte counts when an element is *loaded or stored by a program*. Masked-off lanes
(rows past the sequence end, padded head-dim columns, padded widths) do not count. Every program's loads count,
even when several programs (or several tiles of one program) read the same address — e.g. K/V re-read by every query
block and every query head of a GQA group, a broadcast key-padding mask re-read per query row, the norm weight
re-read per row, cos/sin re-read per head. Caches are ignored: this is the traffic a kernel issues, an upper bound
of what DRAM sees. With a mask tensor the attention kernels (forward, decode and both backward kernels) skip the
tiles the mask keeps nothing of (data the plan cannot see) and read a block list instead, and the forward and backward
kernels run the tiles the mask keeps whole without loading its tile; the plan counts the list as if no tile is
skipped and every visited tile loads the mask, again an upper bound (exact when the mask neither empties nor fills a
tile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tilefuse.codegen.attention_decode import SplitLayout
from tilefuse.codegen.families import KernelFamily, family_record, kernel_family
from tilefuse.codegen.families.attention import AttentionFamily
from tilefuse.codegen.families.attention_backward import AttentionBackwardFamily, BackwardCosts
from tilefuse.codegen.families.base import itemsize, static
from tilefuse.codegen.families.decode import DecodeFamily
from tilefuse.codegen.families.norm import NormFamily
from tilefuse.codegen.kernel_variant import KernelVariant
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec

__all__ = ["TileConfig", "TiledPlan", "io_lower_bound_bytes", "itemsize", "kept_pairs"]

F = TypeVar("F", bound=KernelFamily[Any])


@dataclass(frozen=True)
class TiledPlan:
    """Spec + TileConfig + kernel family: grid, loop structure, HBM bytes read/written, SRAM per program, FLOPs,
    feasibility. `family` names a kernel family (`codegen.families.KERNEL_FAMILIES`); "auto" is the forward
    family the GPU dispatcher picks (the split-KV decode kernel for decode shapes, `attention_decode.use_decode`).
    Each family's module documents its kernels and what its terms count."""

    spec: AttentionSpec | NormSpec | RopeSpec
    config: TileConfig = field(default_factory=TileConfig)
    family: str = "auto"

    @property
    def record(self) -> KernelFamily[Any]:
        """The kernel family record this plan describes (its Spec type checked)."""
        record = family_record(kernel_family(self.spec) if self.family == "auto" else self.family)
        record.check(self.spec)
        return record

    @property
    def kernel_family(self) -> str:
        """The kernel this plan describes: attention, attention_decode, attention_backward, norm, norm_backward or
        rope."""
        return self.record.name

    @property
    def blocks(self) -> tuple[int, ...]:
        """The blocks the launcher really uses: attention (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV); norm (BLOCK,);
        RoPE (BLOCK_ROWS, BLOCK_HALF, BLOCK_TAIL)."""
        return self.record.blocks(self.spec, self.config)

    @property
    def grid(self) -> tuple[int, ...]:
        """The main kernel's grid (the attention backward: its dK/dV kernel's)."""
        return self.record.grid(self.spec, self.config)

    @property
    def hbm_read_bytes(self) -> int:
        """Bytes loaded by all programs of all the family's kernels (see the module docstring)."""
        return self.record.read_bytes(self.spec, self.config)

    @property
    def hbm_write_bytes(self) -> int:
        return self.record.write_bytes(self.spec, self.config)

    @property
    def smem_bytes(self) -> int:
        """Shared memory one program stages (padded blocks); norm and RoPE hold no staged tiles (0)."""
        return self.record.smem_bytes(self.spec, self.config)

    @property
    def sram_bytes(self) -> int:
        """On-chip bytes per program: shared memory + register accumulators, padded blocks."""
        return self.record.sram_bytes(self.spec, self.config)

    @property
    def flops(self) -> int:
        return self.record.flops(self.spec, self.config)

    def infeasible_reasons(self, target: dict[str, Any]) -> list[str]:
        """Why this plan cannot run on `target` ({"smem_bytes": ..., "max_head_dim": ...}); [] when it can."""
        return self.record.infeasible_reasons(self.spec, self.config, target)

    def feasible(self, target: dict[str, Any]) -> bool:
        return not self.infeasible_reasons(target)

    def variants(self) -> tuple[KernelVariant, ...]:
        """The kernels this plan launches whose resources depend on its knobs, main kernel first, as compile-check
        variants (the attention backward: its dK/dV and dQ kernels; one kernel for every other family)."""
        return self.record.variants(self.spec, self.config)

    # ------------------------------------------------------------------- queries of one family (its record's)
    def _on(self, kind: type[F]) -> F:
        record = self.record
        if not isinstance(record, kind):
            raise TypeError(f"a {kind.name} query on a {record.name!r} plan")
        return record

    def key_blocks_per_program(self, m: int) -> range:
        """Start columns of the key blocks query block `m` visits (`AttentionFamily.key_blocks_per_program`)."""
        record = self._on(AttentionFamily)
        return record.key_blocks_per_program(record.check(self.spec), self.config, m)

    def decode_layout(self) -> SplitLayout:
        """The decode launcher's cut of the visible key range into splits (`attention_decode.split_layout`)."""
        record = self._on(DecodeFamily)
        return record.decode_layout(record.check(self.spec), self.config)

    @property
    def combine_grid(self) -> tuple[int, ...]:
        """Grid of the decode family's phase 2 (one program per query row); () for every other family."""
        record = self.record
        return record.combine_grid(record.check(self.spec)) if isinstance(record, DecodeFamily) else ()

    def backward_costs(self) -> BackwardCosts:
        """Grids, bytes and FLOPs of the attention backward's three kernels."""
        record = self._on(AttentionBackwardFamily)
        return record.costs(record.check(self.spec), self.config)

    @property
    def norm_chunked(self) -> bool:
        """Whether a norm plan's rows run the chunked kernels (wider than the row block `blocks[0]`); False for
        every other family."""
        record = self.record
        return isinstance(record, NormFamily) and record.norm_chunked(record.check(self.spec), self.config)


def kept_pairs(spec: AttentionSpec) -> int:
    """(query, key) pairs per head that causal/window keep (mask tensors are data, not counted)."""
    q_len, kv_len = static("q_len", spec.q_len), static("kv_len", spec.kv_len)
    offset = kv_len - q_len if spec.align == "bottom_right" else 0
    total = 0
    for i in range(q_len):
        pos = i + offset
        hi = min(kv_len, pos + 1) if spec.causal else kv_len
        lo = max(0, pos - spec.window + 1) if spec.window else 0
        total += max(0, hi - lo)
    return total


def io_lower_bound_bytes(spec: AttentionSpec, sram_bytes: int) -> int:
    """I/O lower bound of attention (Saha & Ye, "The I/O Complexity of Attention"), in bytes, constant 1:

        max(compulsory, B·Hq · P·D·Dv / M) · element_size      when M >= D·Dv
        max(compulsory, B·Hq · P·sqrt(D·Dv / M)) · element_size  when M <  D·Dv (the matmul-like regime;
                                                                  both forms agree at M = D·Dv)

    with M = sram_bytes / element_size the SRAM in elements, P = `kept_pairs(spec)` (Nq·Nk for full attention,
    fewer under causal/window: skipped pairs need no I/O), and compulsory = read Q, K, V once and write O once.
    The two terms are each a lower bound, so their max is one too (a plain sum is not: with a single query block,
    FlashAttention moves exactly the compulsory bytes). The lse and mask tensors are not part of the bound.
    """
    b, hq = static("batch", spec.batch), static("q_heads", spec.q_heads)
    hkv = static("kv_heads", spec.kv_heads)
    q_len, kv_len = static("q_len", spec.q_len), static("kv_len", spec.kv_len)
    d, dv = spec.head_dim, spec.v_head_dim
    es = itemsize(spec.dtype)
    m_elems = max(sram_bytes / es, 1.0)
    compulsory = b * (hq * q_len * (d + dv) + hkv * kv_len * (d + dv))
    pairs = kept_pairs(spec)
    ratio = d * dv / m_elems if m_elems >= d * dv else math.sqrt(d * dv / m_elems)
    tiled = b * hq * pairs * ratio
    return int(max(compulsory, tiled) * es)
