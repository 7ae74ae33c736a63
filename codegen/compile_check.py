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


@dataclass(frozen=True)
class CompileResult:
    name: str
    arch: str
    ok: bool
    registers: int | None = None
    spill_bytes: int | None = None  # the cubin's stack frame: spilled registers (and local arrays, which we have none)
    shared_bytes: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _attention_fwd() -> Any:
    from .attention_fwd import attention_fwd_kernel

    return attention_fwd_kernel


def _norm_fwd() -> Any:
    from .norm_kernels import _norm_forward_kernel

    return _norm_forward_kernel


def _norm_bwd() -> Any:
    from .norm_kernels import _norm_backward_kernel

    return _norm_backward_kernel


def _rope() -> Any:
    from .rope_kernels import _rope_kernel

    return _rope_kernel


def attention_variant(head_dim: int, masked: bool, rope: bool = False) -> KernelVariant:
    """Causal bf16 attention forward at its default config, with or without a boolean mask tile and RoPE."""
    from .attention_fwd import MASK_BOOL, MASK_NONE, default_config

    block_m, block_n, warps, stages = default_config(head_dim, masked, rope)
    consts = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, BLOCK_DV=head_dim, CAUSAL=True, USE_WINDOW=False,
        MASK_KIND=MASK_BOOL if masked else MASK_NONE, HAS_SOFTCAP=False, HAS_ALIBI=False, INPUT_PRECISION="tf32",
        UPCAST_DOT=False, ROPE_LAYOUT=0 if rope else -1,
    )  # fmt: skip
    pointers = {
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
    name = f"attention_fwd_d{head_dim}{'_mask' if masked else ''}{'_rope' if rope else ''}"
    return KernelVariant(name, _attention_fwd, pointers, ("qk_scale", "softcap_log2"), consts, warps, stages)


def default_variants() -> list[KernelVariant]:
    """Representative specs of every family at the launch options their launchers use (bf16, Llama-like sizes)."""
    from .norm_kernels import num_warps

    bf16 = "*bf16"
    norm_fwd = {n: bf16 for n in ("X", "RES", "W", "B", "Y", "SUM", "MEAN", "RSTD")}
    norm_bwd = {n: bf16 for n in ("G", "X", "W", "MEAN", "RSTD", "DX", "DW_PARTIAL", "DB_PARTIAL")}
    variants = [
        attention_variant(d, masked, rope) for d in (64, 128) for masked in (False, True) for rope in (False, True)
    ]
    for rms in (True, False):
        kind = "rms" if rms else "layer"
        fwd = dict(BLOCK=4096, RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, HAS_RESIDUAL=True)
        variants.append(
            KernelVariant(f"{kind}_norm_fwd", _norm_fwd, norm_fwd, ("eps", "weight_offset"), fwd, num_warps(4096))
        )
        bwd = dict(BLOCK=4096, RMS=rms, HAS_WEIGHT=True)
        variants.append(
            KernelVariant(f"{kind}_norm_bwd", _norm_bwd, norm_bwd, ("weight_offset",), bwd, num_warps(4096))
        )
    rope_ptrs = {"X": bf16, "COS": bf16, "SIN": bf16, "Y": bf16}
    for layout, name in ((0, "rotate_half"), (1, "interleaved")):
        consts = dict(BLOCK_ROWS=16, BLOCK_HALF=64, BLOCK_TAIL=64, LAYOUT=layout, BACKWARD=False, HAS_TAIL=True)
        variants.append(KernelVariant(f"rope_{name}", _rope, rope_ptrs, (), consts, 4))
    return variants


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in fields.items()}


def compile_variant(variant: KernelVariant, arch: str) -> CompileResult:
    """Compile one variant for `arch`; a compile error is a result (ok=False), not an exception."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = variant.kernel()
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(variant.pointers)
    signature.update({name: "fp32" for name in variant.floats})
    signature.update({name: "constexpr" for name in variant.constexprs})
    try:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=variant.constexprs)
        options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
        kernel = triton.compile(source, target=GPUTarget("cuda", ARCHES[arch], 32), options=options)
        usage = _resource_usage(kernel.asm["cubin"])
    except Exception as err:  # compile failures are data for the cost model
        return CompileResult(variant.name, arch, False, error=f"{type(err).__name__}: {str(err)[:300]}")
    shared = int(kernel.metadata.shared) + usage.get("SHARED", 0)
    spill = usage.get("STACK", 0) + usage.get("LOCAL", 0)
    return CompileResult(variant.name, arch, True, usage.get("REG"), spill, shared)


def compile_check(arch: str, variants: list[KernelVariant] | None = None) -> list[CompileResult]:
    """Compile every variant for `arch` ("sm_80", "sm_90", ...)."""
    if arch not in ARCHES:
        raise ValueError(f"arch={arch!r}; supported: {sorted(ARCHES)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile-check cannot run with TRITON_INTERPRET=1: the interpreter replaces kernels")
    return [compile_variant(v, arch) for v in (variants if variants is not None else default_variants())]
