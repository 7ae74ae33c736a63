"""Compile every kernel family for a real GPU target without a GPU, and read its resource use from the cubin.

Triton compiles for `GPUTarget("cuda", arch, 32)` on any machine; the cuobjdump bundled with Triton reads
registers, stack (spill) and static shared memory from the cubin, and Triton's metadata gives the dynamic
shared memory. Runs in-process, so it must not run under TRITON_INTERPRET=1 (the interpreter replaces kernels).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

from . import kernel_variant as kv
from .kernel_variant import KernelVariant
from .tile_config import TileConfig

__all__ = ["ARCHES", "CompileResult", "KernelVariant", "LoopMix", "Representative", "compile_check", "compile_kernel",
           "compile_variant", "decode_variants", "default_variants", "kernel_resources", "loop_instructions",
           "loop_mix", "representative_variant", "representatives"]  # fmt: skip

ARCHES = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


@dataclass(frozen=True)
class LoopMix:
    """The static instruction mix of one loop body of a kernel's SASS, per warp and per iteration (a loop's body is
    the code from a backward branch's target to the branch; an outer loop's counts include its inner loops once).

    kind: "clean" / "masked" for the attention tile loops (the tiles causal/window/a block list keep whole run
    without mask code, the diagonal/edge/listed-partial tiles with it; a single tile loop is "masked", and a tile
    loop count the kernel's phases do not explain is "tile"), "outer" for a loop holding other loops (the backward
    dK/dV's loop over the GQA group's q heads, the chunked norm backward's row loop), "other" for a loop of an
    attention kernel without tensor-core work (summing the block lists), "rows" / "chunks" / "splits" for the
    norm and decode-combine loops ("loop" for any other).
    hgmma: HGMMA (wgmma, sm_90); hmma: HMMA (mma.sync); mufu: MUFU.* (ex2, rcp, tanh, ...); tma: UTMALDG and
    UTMASTG; cp_async: LDGSTS.
    barriers: the waits and fences: block barriers (BAR.*), cp.async group waits (DEPBAR), wgmma fences and waits
    (WARPGROUP.ARRIVE, WARPGROUP.DEPBAR), mbarrier operations (SYNCS.*, TMA's), memory fences (MEMBAR, FENCE.*).
    Not LDGDEPBAR (commits a cp.async group without waiting) nor BSSY/BSYNC/WARPSYNC (reconverge one warp).
    flops: the tensor-core FLOPs one program does in one iteration, from the compiled BLOCK_M (M), BLOCK_N (N),
    BLOCK_D (D) and BLOCK_DV (Dv): forward and decode K/V tile 2·M·N·(D + Dv) (QKᵀ, PV); backward dK/dV
    2·M·N·(2·D + 2·Dv) (QKᵀ, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q); backward dQ 2·M·N·(2·D + Dv) (QKᵀ, dO·Vᵀ, dS·K); 0 for
    outer loops (their tiles are the inner loops'), loops without tensor-core work and norm/RoPE/combine loops.
    density: warp instructions per MFLOP of the loop's tensor-core work, instructions × num_warps / (flops / 1e6)
    (every warp of the program issues the loop's instructions once per iteration); None where flops is 0.
    Static counts: they do not weigh an instruction's latency or throughput, memory stalls, occupancy or trip
    counts.
    """

    kind: str
    instructions: int
    hgmma: int
    hmma: int
    mufu: int
    tma: int
    cp_async: int
    barriers: int
    flops: int
    density: float | None


@dataclass(frozen=True)
class CompileResult:
    name: str
    arch: str
    ok: bool
    registers: int | None = None
    spill_bytes: int | None = None  # the cubin's stack frame: spilled registers (and local arrays, which we have none)
    shared_bytes: int | None = None
    error: str | None = None
    # SASS instructions in the body of each loop, in code order (a static proxy of per-iteration issue work: the
    # attention kernels' unmasked and masked tile loops show up as two entries)
    loop_instructions: tuple[int, ...] = ()
    # The compiled launch config (block_m, block_n, num_warps, num_stages) and head dim of a representative kernel
    # (None when compiled from a bare variant; head_dim None for norms)
    config: dict[str, int] | None = None
    head_dim: int | None = None
    loops: tuple[LoopMix, ...] = ()  # the instruction mix of each loop, in the order of loop_instructions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Representative(NamedTuple):
    """One kernel compile-check reports under `name`: the `kernel`-th of the family record's `checked_variants`
    for `spec` at `config` (attention backward: dK/dV then dQ; decode: the split kernel then the combine)."""

    name: str
    family: str
    spec: Spec
    config: TileConfig
    kernel: int = 0


_PREFILL = AttentionSpec(  # Llama-3-8B-like prefill: Hq 32, Hkv 8, N 4096, contiguous, causal bf16
    batch=2, q_heads=32, kv_heads=8, q_len=4096, kv_len=4096, head_dim=128, v_head_dim=128, dtype="bfloat16",
    scale=128**-0.5, causal=True, gqa_group=4,
)  # fmt: skip
_DECODE = AttentionSpec(  # Llama-70B-like decode: B 4, Hq 64, Hkv 8, Nk 4096, D 128, bottom-right causal
    batch=4, q_heads=64, kv_heads=8, q_len=1, kv_len=4096, head_dim=128, v_head_dim=128, dtype="bfloat16",
    scale=128**-0.5, causal=True, align="bottom_right", gqa_group=8,
)  # fmt: skip
_DECODE_SPLITS = 8


def _attention(
    base: AttentionSpec, head_dim: int = 128, masked: bool = False, rope: int = 0, dropout: bool = False, **dims: Any
) -> AttentionSpec:
    """`base` at `head_dim`, with a [B, 1, 1, Nk] key-padding mask, RoPE over `rope` features (rotate-half; the
    table [N, rope], or [1, rope] when Nq != Nk) and dropout as asked."""
    spec = replace(base, head_dim=head_dim, v_head_dim=head_dim, scale=head_dim**-0.5, **dims)
    if masked:
        spec = replace(spec, mask="key_padding", mask_shape=(spec.batch, 1, 1, spec.kv_len))
    if rope:
        spec = replace(spec, rope=RopeSpec("rotate_half", rope, head_dim))
    return replace(spec, dropout_p=0.1) if dropout else spec


def _suffix(masked: bool = False, rope: int = 0, dropout: bool = False) -> str:
    return f"{'_mask' if masked else ''}{'_rope' if rope else ''}{'_dropout' if dropout else ''}"


def _forward() -> list[Representative]:
    """The FA2 forward at its launcher's default config: D 64 and 128 with and without a mask tile and RoPE,
    dropout with a mask or RoPE, D 256."""
    features = [(d, masked, rope, False) for d in (64, 128) for masked in (False, True) for rope in (False, True)]
    features += [(128, True, False, True), (128, False, True, True), (256, False, False, False),
                 (256, False, True, False)]  # fmt: skip
    entries = []
    for d, masked, rope, dropout in features:
        spec = _attention(_PREFILL, d, masked, d if rope else 0, dropout)
        entries.append(Representative(f"attention_fwd_d{d}{_suffix(masked, rope, dropout)}", "attention", spec,
                                      family_default(spec, "attention")))  # fmt: skip
    return entries


def _decode() -> list[Representative]:
    """Split-KV decode at its default configs and 8 splits: phase 1 for 16 packed rows (8 heads x 2 speculative
    tokens, BLOCK_M 16) with and without a mask tile / RoPE, for 64 (8 heads x 8 tokens), and phase 2 after a
    single-token step."""
    entries = []
    for q_len, masked, rope in ((2, False, False), (2, True, False), (2, False, True), (8, False, False)):
        spec = _attention(_DECODE, 128, masked, 128 if rope else 0, q_len=q_len)
        name = f"attention_decode_d128_m{8 * q_len}{_suffix(masked, rope)}"
        entries.append(Representative(name, "attention_decode", spec, _decode_config(spec)))
    step = _attention(_DECODE)  # phase 2 after a single-token step
    entries.append(Representative("attention_decode_combine_d128", "attention_decode", step, _decode_config(step), 1))
    return entries


def _decode_config(spec: AttentionSpec) -> TileConfig:
    return replace(family_default(spec, "attention_decode"), num_splits=_DECODE_SPLITS)


def _backward() -> list[Representative]:
    """The attention backward's dK/dV and dQ kernels, each at its launcher default: plain, RoPE (rotate-half, the
    register-permutation epilogue), RoPE over 96 of 128 features (the tl.gather epilogue), dropout, and a
    key-padding mask with its block lists (tile skipping)."""
    from .families.attention_backward import ATTENTION_BACKWARD

    features = (("", 0, False, False), ("_rope", 128, False, False), ("_rope_gather", 96, False, False),
                ("_dropout", 0, True, False), ("_mask", 0, False, True))  # fmt: skip
    entries = []
    for suffix, rope, dropout, masked in features:
        spec = _attention(_PREFILL, 128, masked, rope, dropout)
        configs = ATTENTION_BACKWARD.launcher_configs(spec)
        for kernel, (kind, config) in enumerate(zip(("dkdv", "dq"), configs, strict=True)):
            entries.append(Representative(f"attention_bwd_{kind}_d128{suffix}", "attention_backward", spec, config,
                                          kernel))  # fmt: skip
    return entries


def _norms(widths: tuple[int, ...] = (4096, 8192, 16384, 32768)) -> list[Representative]:
    """bf16 RMSNorm (weight) and LayerNorm (weight, bias) with a residual add, forward and backward (16384 rows over
    132 programs), at the launcher's defaults for each width: whole rows up to `norm_kernels.MAX_ROW_BLOCK`, the
    chunked kernels beyond (named `..._chunk<columns>`). Width 4096 keeps the short names (`rms_norm_fwd`)."""
    from .norm_kernels import default_row_block, is_chunked

    entries = []
    for width in widths:
        block = default_row_block(width)
        suffix = "" if width == 4096 else f"_{width}" + (f"_chunk{block}" if is_chunked(width, block) else "")
        for rms in (True, False):
            spec = NormSpec("rmsnorm" if rms else "layernorm", width, (16384, width), "bfloat16", 1e-5,
                            has_bias=not rms, residual=True, out_dtype="bfloat16")  # fmt: skip
            for family, kind in (("norm", "fwd"), ("norm_backward", "bwd")):
                entries.append(Representative(f"{'rms' if rms else 'layer'}_norm_{kind}{suffix}", family, spec,
                                              family_default(spec, family)))  # fmt: skip
    return entries


def _ropes() -> list[Representative]:
    """Standalone RoPE over 128 of 192 features (a rotated half and an unrotated tail of 64 each) of a [2, 32,
    4096, 192] bf16 tensor [B, H, N, D], both layouts, at the launcher's default config."""
    entries = []
    for layout in ("rotate_half", "interleaved"):
        spec = RopeSpec(layout, 128, 192, (2, 32, 4096, 192), "bfloat16")
        entries.append(Representative(f"rope_{layout}", "rope", spec, family_default(spec, "rope")))
    return entries


def family_default(spec: Spec, family: str) -> TileConfig:
    """The config the launcher of `family` uses for `spec` when given none."""
    from .families import default_config

    return default_config(spec, family)


def representatives() -> list[Representative]:
    """The kernels compile-check reports by default: representative Specs of every family (bf16, Llama-like sizes)
    at the launch options their launchers use."""
    return _forward() + _decode() + _backward() + _norms() + _ropes()


def representative_variant(entry: Representative) -> KernelVariant:
    """The compile-check variant of `entry`, built by its family record and given the entry's name."""
    from .families import family_record

    record = family_record(entry.family)
    return replace(record.checked_variants(record.check(entry.spec), entry.config)[entry.kernel], name=entry.name)


def default_variants() -> list[KernelVariant]:
    """Every representative kernel, at the launch options its launcher uses (`representatives`)."""
    return [representative_variant(entry) for entry in representatives()]


def decode_variants() -> list[KernelVariant]:
    """The split-KV decode kernels of `representatives`: phase 1 (BLOCK_M 16 plain, masked, RoPE; BLOCK_M 64),
    then phase 2."""
    return [representative_variant(entry) for entry in _decode()]


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> dict[str, int]:
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump(cubin, "--dump-resource-usage")))
    return {k: int(v) for k, v in fields.items()}


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", re.MULTILINE)


class _Loop(NamedTuple):
    start: int  # address of the backward branch's target
    end: int  # address of the backward branch
    body: list[str]  # the instructions (text after the address) from start to end, both included


def _loops(sass: str) -> list[_Loop]:
    """The loops of `cuobjdump -sass` text: every branch back to an earlier address closes a loop from its target up
    to the branch. Ordered by the branch's address; an outer loop's body holds the loops inside it too."""
    instructions = [(int(addr, 16), text) for addr, text in _SASS_LINE.findall(sass)]
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            loops.append(_Loop(start, address, [t for a, t in instructions if start <= a <= address]))
    return loops


def loop_instructions(sass: str) -> tuple[int, ...]:
    """SASS instructions in each loop body of `cuobjdump -sass` text (`_loops`): ordered by the closing branch's
    address; an outer loop counts the loops inside it too."""
    return tuple(len(loop.body) for loop in _loops(sass))


_OPCODE = re.compile(r"^(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_BARRIER_OPCODES = frozenset({"BAR", "DEPBAR", "WARPGROUP", "SYNCS", "MEMBAR", "FENCE"})  # LoopMix.barriers


def _opcode(text: str) -> str:
    """The opcode of one SASS instruction without predicate and modifiers ("@!P0 BAR.SYNC 0x0" gives "BAR")."""
    match = _OPCODE.match(text)
    return match.group(1) if match else ""


def _counts(body: list[str]) -> dict[str, int]:
    """The instruction and opcode-class counts of `LoopMix` for one loop body."""
    ops = [_opcode(text) for text in body]
    return {
        "instructions": len(body),
        "hgmma": ops.count("HGMMA"),
        "hmma": ops.count("HMMA"),
        "mufu": ops.count("MUFU"),
        "tma": sum(op in ("UTMALDG", "UTMASTG") for op in ops),
        "cp_async": ops.count("LDGSTS"),
        "barriers": sum(op in _BARRIER_OPCODES for op in ops),
    }


# Tensor-core FLOPs of one tile-loop iteration from (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV), per kernel (`LoopMix`).
_TILE_FLOPS: dict[Callable[[], Any], Callable[[int, int, int, int], int]] = {
    kv.attention_fwd_kernel: lambda m, n, d, dv: 2 * m * n * (d + dv),
    kv.decode_split_kernel: lambda m, n, d, dv: 2 * m * n * (d + dv),
    kv.attention_bwd_dkdv_kernel: lambda m, n, d, dv: 2 * m * n * (2 * d + 2 * dv),
    kv.attention_bwd_dq_kernel: lambda m, n, d, dv: 2 * m * n * (2 * d + dv),
}
# The kind of a loop holding no other loop, for kernels without tile loops.
_LEAF_KIND = {kv.norm_fwd_kernel: "rows", kv.norm_bwd_kernel: "rows", kv.norm_fwd_chunked_kernel: "chunks",
              kv.norm_bwd_chunked_kernel: "chunks", kv.decode_combine_kernel: "splits"}  # fmt: skip


def _tile_kinds(variant: KernelVariant, tiles: int) -> list[str]:
    """Kinds of an attention kernel's `tiles` tensor-core loops in code order: its phases (attention_fwd,
    attention_bwd) compile a clean loop unless a data mask comes without a block list, then a masked one; decode
    masks every tile."""
    two_phases = variant.kernel is not kv.decode_split_kernel and (
        variant.constexprs.get("MASK_KIND", 0) == 0 or bool(variant.constexprs.get("SKIP_TILES"))
    )
    expected = ["clean", "masked"] if two_phases else ["masked"]
    return expected if tiles == len(expected) else ["tile"] * tiles


def loop_mix(sass: str, variant: KernelVariant) -> tuple[LoopMix, ...]:
    """The `LoopMix` of every loop of `sass` (the SASS of `variant`), in the order of `loop_instructions`."""
    loops = _loops(sass)
    counts = [_counts(loop.body) for loop in loops]
    outer = [any(o is not loop and loop.start <= o.start and o.end <= loop.end for o in loops) for loop in loops]
    flops_of = _TILE_FLOPS.get(variant.kernel)
    tensor = [
        flops_of is not None and not out and c["hgmma"] + c["hmma"] > 0 for c, out in zip(counts, outer, strict=True)
    ]
    tile_kinds = iter(_tile_kinds(variant, sum(tensor)))
    tile_flops = 0
    if flops_of is not None:
        c = variant.constexprs
        tile_flops = flops_of(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], c["BLOCK_DV"])
    mixes = []
    for count, out, is_tile in zip(counts, outer, tensor, strict=True):
        if out:
            kind = "outer"
        elif is_tile:
            kind = next(tile_kinds)
        else:
            kind = "other" if flops_of is not None else _LEAF_KIND.get(variant.kernel, "loop")
        flops = tile_flops if is_tile else 0
        density = count["instructions"] * variant.num_warps / (flops / 1e6) if flops else None
        mixes.append(LoopMix(kind, flops=flops, density=density, **count))
    return tuple(mixes)


def compile_kernel(variant: KernelVariant, arch: str) -> Any:
    """The Triton kernel of `variant` compiled for `arch` (`.asm`: ttir, ttgir, llir, ptx, cubin; `.metadata`).
    Raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import emit

    # Compile the emitted source the launcher runs: literal constexprs are baked in, the rest stay parameters.
    emitted = emit.specialize(variant.kernel(), variant.constexprs)
    fn = emitted.kernel
    constexprs = {k: v for k, v in variant.constexprs.items() if k not in emitted.baked}
    signature = {name: "i32" for name in fn.arg_names}
    signature.update({k: v for k, v in variant.pointers.items() if k in signature})
    signature.update({name: "fp32" for name in variant.floats if name in signature})
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    if variant.ints is not None:
        constexprs.update({k: 1 for k, v in variant.ints.items() if v == 1 and k in signature})
        aligned = {k for k, v in variant.ints.items() if v % 16 == 0} | set(variant.pointers)
        attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(fn.arg_names) if k in aligned - set(constexprs)}
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", ARCHES[arch], 32), options=options)


def kernel_resources(kernel: Any) -> tuple[int | None, int, int]:
    """(registers per thread, spill bytes per thread, shared memory bytes per program) of a compiled kernel."""
    usage = _resource_usage(kernel.asm["cubin"])
    shared = int(kernel.metadata.shared) + usage.get("SHARED", 0)
    return usage.get("REG"), usage.get("STACK", 0) + usage.get("LOCAL", 0), shared


def _config(variant: KernelVariant, entry: Representative) -> dict[str, int]:
    """The launch config `variant` compiled with: block_m/block_n are its BLOCK_M/BLOCK_N where it has them (decode
    packs the group's query rows into BLOCK_M), else the entry's TileConfig (whose knobs a family reads only in
    part: a norm's block_n is its row block, RoPE's block_m its rows per program); num_warps/num_stages as
    compiled."""
    return {
        "block_m": int(variant.constexprs.get("BLOCK_M", entry.config.block_m)),
        "block_n": int(variant.constexprs.get("BLOCK_N", entry.config.block_n)),
        "num_warps": variant.num_warps,
        "num_stages": variant.num_stages,
    }


def compile_variant(variant: KernelVariant, arch: str, entry: Representative | None = None) -> CompileResult:
    """Compile one variant for `arch`; a compile error is a result (ok=False), not an exception. With the
    `entry` it was built from, the result also carries its config and head dim."""
    described: dict[str, Any] = {}
    if entry is not None:
        described = {"config": _config(variant, entry), "head_dim": getattr(entry.spec, "head_dim", None)}
    try:
        kernel = compile_kernel(variant, arch)
        registers, spill, shared = kernel_resources(kernel)
        sass = _cuobjdump(kernel.asm["cubin"], "-sass")
        loops, mix = loop_instructions(sass), loop_mix(sass, variant)
    except Exception as err:  # compile failures are data for the cost model
        error = f"{type(err).__name__}: {str(err)[:300]}"
        return CompileResult(variant.name, arch, False, error=error, **described)
    return CompileResult(variant.name, arch, True, registers, spill, shared, loop_instructions=loops, loops=mix,
                         **described)  # fmt: skip


def compile_check(arch: str, variants: list[KernelVariant] | None = None) -> list[CompileResult]:
    """Compile every variant for `arch` ("sm_80", "sm_90", ...); by default the `representatives`, with their
    configs and head dims."""
    if arch not in ARCHES:
        raise ValueError(f"arch={arch!r}; supported: {sorted(ARCHES)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile-check cannot run with TRITON_INTERPRET=1: the interpreter replaces kernels")
    if variants is not None:
        return [compile_variant(v, arch) for v in variants]
    return [compile_variant(representative_variant(entry), arch, entry) for entry in representatives()]
