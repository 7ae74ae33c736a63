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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARCHES = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


@dataclass(frozen=True)
class KernelVariant:
    """One kernel with a representative signature, constexprs and launch options."""

    name: str
    kernel: Callable[[], Any]  # returns the @triton.jit function (imported lazily)
    pointers: dict[str, str]
    floats: tuple[str, ...]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 2
    # Integer argument values of a representative launch. When given, the compile specializes as a launch does:
    # an int equal to 1 becomes a constant, multiples of 16 and every pointer get tt.divisibility=16 (enables
    # vectorized loads and cp.async pipelining; the TTGIR and shared memory differ from the unspecialized build).
    ints: dict[str, int] | None = None


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _attention_fwd() -> Any:
    from .attention_fwd import attention_fwd_kernel

    return attention_fwd_kernel


def _decode_split() -> Any:
    from .attention_decode import attention_decode_split_kernel

    return attention_decode_split_kernel


def _decode_combine() -> Any:
    from .attention_decode import attention_decode_combine_kernel

    return attention_decode_combine_kernel


def _norm_fwd() -> Any:
    from .norm_kernels import norm_forward_kernel

    return norm_forward_kernel


def _norm_bwd() -> Any:
    from .norm_kernels import norm_backward_kernel

    return norm_backward_kernel


def _norm_fwd_chunked() -> Any:
    from .norm_kernels import norm_forward_chunked_kernel

    return norm_forward_chunked_kernel


def _norm_bwd_chunked() -> Any:
    from .norm_kernels import norm_backward_chunked_kernel

    return norm_backward_chunked_kernel


def _rope() -> Any:
    from .rope_kernels import rope_kernel

    return rope_kernel


def attention_variant(head_dim: int, masked: bool, rope: bool = False, dropout: bool = False) -> KernelVariant:
    """Causal bf16 attention forward at its default config, with or without a boolean mask tile, RoPE, dropout."""
    from .attention_fwd import MASK_BOOL, MASK_NONE, default_config

    block_m, block_n, warps, stages = default_config(head_dim, masked, rope, dropout)
    consts = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, BLOCK_DV=head_dim, CAUSAL=True, USE_WINDOW=False,
        MASK_KIND=MASK_BOOL if masked else MASK_NONE, HAS_SOFTCAP=False, HAS_ALIBI=False, INPUT_PRECISION="tf32",
        UPCAST_DOT=False, ROPE_LAYOUT=0 if rope else -1, HAS_DROPOUT=dropout, SKIP_TILES=masked,
        SCALE_IN_EXP=True,  # a positive scale, no softcap/ALiBi/additive mask
    )  # fmt: skip
    pointers = {
        "Rng": "*i64",
        "BlockIdx": "*i32",
        "BlockCount": "*i32",
        "Q": "*bf16",
        "K": "*bf16",
        "V": "*bf16",
        "Out": "*bf16",
        "Lse": "*fp32",
        "Mask": "*u8",
        "Alibi": "*fp32",
        "Cos": "*bf16",
        "Sin": "*bf16",
    }
    name = (
        f"attention_fwd_d{head_dim}{'_mask' if masked else ''}{'_rope' if rope else ''}{'_dropout' if dropout else ''}"
    )
    ints = _prefill_ints(head_dim, masked, rope)
    return KernelVariant(name, _attention_fwd, pointers, ("qk_scale", "softcap_log2"), consts, warps, stages, ints)


def _prefill_ints(d: int, masked: bool, rope: bool) -> dict[str, int]:
    """Integer arguments of a Llama-3-8B-like prefill launch (Hq 32, Hkv 8, N 4096, contiguous, batch > 1), so the
    compile gets the specialization a real launch gets (unit strides folded, multiples of 16 marked aligned)."""
    heads, kv_heads, n = 32, 8, 4096
    ints: dict[str, int] = {}
    for t, h, row in (("q", heads, "m"), ("k", kv_heads, "n"), ("v", kv_heads, "n"), ("o", heads, "m")):
        ints |= {f"stride_{t}b": h * n * d, f"stride_{t}h": n * d, f"stride_{t}{row}": d, f"stride_{t}d": 1}
    if masked:  # a [B, 1, 1, N] key-padding mask and its block list ([B, 1, 1, N / 64] and [B, 1, 1, 2])
        ints |= dict(stride_mb=n, stride_mh=0, stride_mm=0, stride_mn=1)
        ints |= _key_padding_list_ints(n // 128, n // 64, by_key=False)
    if rope:  # an [N, d] table shared by batch and heads
        ints |= dict(stride_cb=0, stride_ch=0, stride_cn=d, stride_cd=1)
        ints |= dict(stride_sb=0, stride_sh=0, stride_sn=d, stride_sd=1)
    ints |= dict(num_q_heads=heads, group=heads // kv_heads, q_len=n, kv_len=n, head_dim=d, head_dim_v=d)
    ints |= dict(rotary_dim=d if rope else 0, window=0, pos_offset=0)
    return ints


def _decode_ints(q_len: int, masked: bool, rope: bool) -> dict[str, int]:
    """Integer arguments of a Llama-70B-like decode launch (B 4, Hq 64, Hkv 8, Nk 4096, D 128, contiguous)."""
    heads, kv_heads, kv_len, d = 64, 8, 4096, 128
    ints = dict(stride_qb=heads * q_len * d, stride_qh=q_len * d, stride_qm=d, stride_qd=1)
    for t in "kv":
        kv_strides = (kv_heads * kv_len * d, kv_len * d, d, 1)
        ints |= {f"stride_{t}{dim}": stride for dim, stride in zip("bhnd", kv_strides, strict=True)}
    if masked:  # a [B, 1, 1, Nk] key-padding mask and its kept key blocks ([B, 1, Nk / 64] and [B, 1, Nk / 64 + 1])
        ints.update(stride_mb=kv_len, stride_mh=0, stride_mm=0, stride_mn=1)
        ints.update(stride_ib=kv_len // 64, stride_ih=0, stride_pb=kv_len // 64 + 1, stride_ph=0)
    if rope:  # a [1, r] table shared by all positions (the only shape reference.rope_qk allows with Nq != Nk)
        ints.update(stride_cb=0, stride_ch=0, stride_cn=0, stride_cd=1, stride_sb=0, stride_sh=0, stride_sn=0,
                    stride_sd=1, rotary_dim=d)  # fmt: skip
    ints.update(kv_heads=kv_heads, group=heads // kv_heads, q_len=q_len, kv_len=kv_len, head_dim=d, head_dim_v=d,
                window=0, pos_offset=kv_len - q_len, vis_lo=0, vis_hi=kv_len, split_len=512, num_splits=8,
                work_splits=8)  # fmt: skip
    return ints


def decode_variants(head_dim: int = 128) -> list[KernelVariant]:
    """Split-KV decode at its default configs, bf16: phase 1 for a group of 8 single-row queries (BLOCK_M 16) with
    and without a mask tile / RoPE, for 64 packed rows (8 heads x 8 speculative tokens), and phase 2."""
    from .attention_decode import COMBINE_WARPS, decode_config
    from .attention_fwd import MASK_BOOL, MASK_NONE

    bf16, fp32 = "*bf16", "*fp32"
    pointers = dict(Q=bf16, K=bf16, V=bf16, Acc=fp32, Stat=fp32, Mask="*u8", Alibi=fp32, Cos=bf16, Sin=bf16,
                    Rng="*i64", BlockIdx="*i32", BlockPrefix="*i32")  # fmt: skip
    variants = []
    for block_m, masked, rope in ((16, False, False), (16, True, False), (16, False, True), (64, False, False)):
        block_n, warps, stages = decode_config(block_m, head_dim, rope)
        consts = dict(
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, BLOCK_DV=head_dim, CAUSAL=True, USE_WINDOW=False,
            MASK_KIND=MASK_BOOL if masked else MASK_NONE, HAS_SOFTCAP=False, HAS_ALIBI=False,
            INPUT_PRECISION="tf32", UPCAST_DOT=False, ROPE_LAYOUT=0 if rope else -1, HAS_DROPOUT=False,
            SKIP_TILES=masked,
        )  # fmt: skip
        name = f"attention_decode_d{head_dim}_m{block_m}{'_mask' if masked else ''}{'_rope' if rope else ''}"
        ints = _decode_ints(block_m // 8, masked, rope) if head_dim == 128 else None
        floats = ("qk_scale", "softcap_log2", "drop_p", "drop_scale")
        variants.append(KernelVariant(name, _decode_split, pointers, floats, consts, warps, stages, ints))
    combine = dict(Acc=fp32, Stat=fp32, Out=bf16, Lse=fp32)
    ints = dict(stride_ob=64 * head_dim, stride_oh=head_dim, stride_om=head_dim, stride_od=1, num_q_heads=64,
                q_len=1, head_dim_v=head_dim, num_splits=8, work_splits=8)  # fmt: skip
    variants.append(KernelVariant(f"attention_decode_combine_d{head_dim}", _decode_combine, combine, (),
                                  dict(BLOCK_S=8, BLOCK_DV=head_dim), COMBINE_WARPS, ints=ints))  # fmt: skip
    return variants


def _attention_bwd_dkdv() -> Any:
    from .attention_bwd import attention_bwd_dkdv_kernel

    return attention_bwd_dkdv_kernel


def _attention_bwd_dq() -> Any:
    from .attention_bwd import attention_bwd_dq_kernel

    return attention_bwd_dq_kernel


def backward_ints(forward: dict[str, int]) -> dict[str, int]:
    """Integer arguments of the attention backward kernels from the forward's (`_prefill_ints`): contiguous dO and
    dQ strided like O and Q, dK and dV like K and V."""
    ints = dict(forward)
    for grad, like, dims in (("g", "o", "bhmd"), ("dq", "q", "bhmd"), ("dk", "k", "bhnd"), ("dv", "v", "bhnd")):
        ints |= {f"stride_{grad}{dim}": forward[f"stride_{like}{dim}"] for dim in dims}
    return ints


def _key_padding_list_ints(q_blocks: int, kv_blocks: int, by_key: bool) -> dict[str, int]:
    """Strides of a [B, 1, 1, N] key-padding mask's block list: [B, 1, 1, key blocks] shared by every query block
    (counts [B, 1, 1, 2]), or by key ([B, 1, key blocks, query blocks], one list per key block; counts
    [B, 1, key blocks, 2])."""
    if by_key:
        return dict(stride_ib=kv_blocks * q_blocks, stride_ih=0, stride_im=q_blocks, stride_nb=2 * kv_blocks,
                    stride_nh=0, stride_nm=2)  # fmt: skip
    return dict(stride_ib=kv_blocks, stride_ih=0, stride_im=0, stride_nb=2, stride_nh=0, stride_nm=0)


def attention_bwd_variants(head_dim: int = 128) -> list[KernelVariant]:
    """Causal bf16 attention backward (dK/dV and dQ kernels) at `backward_config` with a Llama-like prefill's ints:
    plain, RoPE (rotate-half, the register-permutation epilogue), RoPE with a non-power-of-two span (rotary dim 96:
    the tl.gather epilogue), dropout, and a key-padding mask with its block lists (tile skipping)."""
    from .attention_args import backward_config
    from .attention_fwd import MASK_BOOL, MASK_NONE

    bf16, fp32 = "*bf16", "*fp32"
    pointers = dict(Q=bf16, K=bf16, V=bf16, DO=bf16, DQ=bf16, DK=bf16, DV=bf16, Lse=fp32, Delta=fp32, Mask="*u8",
                    Alibi=fp32, Cos=bf16, Sin=bf16, Rng="*i64", BlockIdx="*i32", BlockCount="*i32")  # fmt: skip
    floats = ("sm_scale", "qk_scale", "softcap_log2", "drop_p", "drop_scale")
    variants = []
    features = (  # (suffix, RoPE layout, SWAP_SPAN, dropout, mask)
        ("", -1, 0, False, False), ("_rope", 0, head_dim, False, False), ("_rope_gather", 0, 0, False, False),
        ("_dropout", -1, 0, True, False), ("_mask", -1, 0, False, True),
    )  # fmt: skip
    for suffix, layout, span, dropout, masked in features:
        configs = backward_config(head_dim, masked, layout >= 0, dropout)
        forward = _prefill_ints(head_dim, masked, layout >= 0)
        if layout >= 0 and not span:
            forward["rotary_dim"] = 3 * head_dim // 4
        for kind, kernel, config in (("dkdv", _attention_bwd_dkdv, configs[0]), ("dq", _attention_bwd_dq, configs[1])):
            consts = dict(
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=head_dim, BLOCK_DV=head_dim, CAUSAL=True,
                USE_WINDOW=False, MASK_KIND=MASK_BOOL if masked else MASK_NONE, HAS_SOFTCAP=False, HAS_ALIBI=False,
                INPUT_PRECISION="tf32", UPCAST_DOT=False, ROPE_LAYOUT=layout, SWAP_SPAN=span, HAS_DROPOUT=dropout,
                SKIP_TILES=masked,
            )  # fmt: skip
            ints = backward_ints(forward)
            if masked:
                n = forward["q_len"]
                ints |= _key_padding_list_ints(n // config.block_m, n // config.block_n, kind == "dkdv")
            name = f"attention_bwd_{kind}_d{head_dim}{suffix}"
            variants.append(
                KernelVariant(name, kernel, pointers, floats, consts, config.num_warps, config.num_stages, ints)
            )
    return variants


def default_variants() -> list[KernelVariant]:
    """Representative specs of every family at the launch options their launchers use (bf16, Llama-like sizes)."""
    bf16 = "*bf16"
    variants = [
        attention_variant(d, masked, rope) for d in (64, 128) for masked in (False, True) for rope in (False, True)
    ]
    variants += [
        attention_variant(d, masked, rope, dropout=True) for d, masked, rope in ((128, True, False), (128, False, True))
    ]
    variants += [attention_variant(256, False, rope) for rope in (False, True)]
    variants += decode_variants()
    variants += attention_bwd_variants()
    variants += norm_variants()
    rope_ptrs = {"X": bf16, "COS": bf16, "SIN": bf16, "Y": bf16}
    for layout, name in ((0, "rotate_half"), (1, "interleaved")):
        consts = dict(BLOCK_ROWS=16, BLOCK_HALF=64, BLOCK_TAIL=64, LAYOUT=layout, BACKWARD=False, HAS_TAIL=True)
        variants.append(KernelVariant(f"rope_{name}", _rope, rope_ptrs, (), consts, 4))
    return variants


def norm_variants(widths: tuple[int, ...] = (4096, 8192, 16384, 32768)) -> list[KernelVariant]:
    """bf16 RMSNorm (weight) and LayerNorm (weight, bias) with a residual add, forward and backward (16384 rows over
    132 programs), at the launcher's defaults for each width: whole rows up to `norm_kernels.MAX_ROW_BLOCK`, the
    chunked kernels beyond (named `..._chunk<columns>`). Width 4096 keeps the short names (`rms_norm_fwd`)."""
    from .norm_kernels import default_row_block, default_warps, is_chunked

    fwd_ptrs = {n: "*bf16" for n in ("X", "RES", "W", "B", "Y", "SUM")} | {"MEAN": "*fp32", "RSTD": "*fp32"}
    bwd_ptrs = {n: "*bf16" for n in ("G", "X", "W", "DX")} | {n: "*fp32" for n in ("MEAN", "RSTD", "DW_PARTIAL",
                                                                                      "DB_PARTIAL")}  # fmt: skip
    variants = []
    for width in widths:
        block = default_row_block(width)
        chunked = is_chunked(width, block)
        size, warps = {"CHUNK" if chunked else "BLOCK": block}, default_warps(block, chunked)
        suffix = "" if width == 4096 else f"_{width}" + (f"_chunk{block}" if chunked else "")
        for rms in (True, False):
            kind = "rms" if rms else "layer"
            fwd = size | dict(RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, HAS_RESIDUAL=True, EPS_MODE=0)
            variants.append(KernelVariant(
                f"{kind}_norm_fwd{suffix}", _norm_fwd_chunked if chunked else _norm_fwd, fwd_ptrs,
                ("eps", "weight_offset", "norm_scale"), fwd, warps, ints={"width": width},
            ))  # fmt: skip
            ints = {"rows": 16384, "width": width, "rows_per_program": 125}
            variants.append(KernelVariant(
                f"{kind}_norm_bwd{suffix}", _norm_bwd_chunked if chunked else _norm_bwd, bwd_ptrs,
                ("weight_offset", "eps", "norm_scale"), size | dict(RMS=rms, HAS_WEIGHT=True, EPS_MODE=0), warps,
                ints=ints,
            ))  # fmt: skip
    return variants


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


def loop_instructions(sass: str) -> tuple[int, ...]:
    """SASS instructions in each loop body of `cuobjdump -sass` text: every branch back to an earlier address closes
    a loop from its target up to the branch, both included. Ordered by the branch's address; an outer loop counts
    the loops inside it too."""
    instructions = [(int(addr, 16), text) for addr, text in _SASS_LINE.findall(sass)]
    bodies = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            bodies.append(sum(1 for a, _ in instructions if start <= a <= address))
    return tuple(bodies)


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


def compile_variant(variant: KernelVariant, arch: str) -> CompileResult:
    """Compile one variant for `arch`; a compile error is a result (ok=False), not an exception."""
    try:
        kernel = compile_kernel(variant, arch)
        registers, spill, shared = kernel_resources(kernel)
        loops = loop_instructions(_cuobjdump(kernel.asm["cubin"], "-sass"))
    except Exception as err:  # compile failures are data for the cost model
        return CompileResult(variant.name, arch, False, error=f"{type(err).__name__}: {str(err)[:300]}")
    return CompileResult(variant.name, arch, True, registers, spill, shared, loop_instructions=loops)


def compile_check(arch: str, variants: list[KernelVariant] | None = None) -> list[CompileResult]:
    """Compile every variant for `arch` ("sm_80", "sm_90", ...)."""
    if arch not in ARCHES:
        raise ValueError(f"arch={arch!r}; supported: {sorted(ARCHES)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile-check cannot run with TRITON_INTERPRET=1: the interpreter replaces kernels")
    return [compile_variant(v, arch) for v in (variants if variants is not None else default_variants())]
