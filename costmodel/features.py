"""Compiler features of one kernel configuration, without a GPU: compile for the target arch on the CPU, read the
TTGIR op mix through `costmodel.mlir`, and registers / spills / shared memory from the cubin.

A compile failure is a result (status "infeasible" with the reason), not an exception. Results are cached on disk
as JSON under $TILEFUSE_CACHE_DIR/features (default ~/.cache/tilefuse), keyed by the kernel's source, the variant
(constexprs, integer specialization, launch options) and the arch. Under TRITON_INTERPRET=1 the interpreter
replaces @triton.jit functions in this process, so the compile runs in a child process instead.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tilefuse.codegen.compile_check import ARCHES, compile_kernel, kernel_resources
from tilefuse.codegen.kernel_variant import KernelVariant
from tilefuse.codegen.plan import TiledPlan

from .cache import FeatureCache, default_cache
from .hardware import max_smem_per_block
from .mlir import MlirModule, parse_module

SCHEMA_VERSION = 1

# Summary counts: each is the number of TTGIR ops with one of these names (loop bodies count once).
OP_GROUPS: dict[str, tuple[str, ...]] = {
    "dots": ("tt.dot", "tt.dot_scaled", "ttng.warp_group_dot", "ttng.tc_gen5_mma"),
    "wgmma": ("ttng.warp_group_dot",),
    "loads": ("tt.load", "tt.descriptor_load"),
    "stores": ("tt.store", "tt.descriptor_store"),
    "async_copies": ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local"),
    "async_waits": ("ttg.async_wait", "ttng.warp_group_dot_wait", "ttng.wait_barrier"),
    "local_allocs": ("ttg.local_alloc",),
    "local_loads": ("ttg.local_load",),
    "layout_converts": ("ttg.convert_layout",),
    "exps": ("math.exp", "math.exp2"),
    "reductions": ("tt.reduce",),
    "loops": ("scf.for", "scf.while"),
    "branches": ("scf.if",),
    "atomics": ("tt.atomic_rmw", "tt.atomic_cas"),
}


@dataclass(frozen=True)
class KernelFeatures:
    """What the compiler says about one (kernel, config, arch). `dot_flops` is 2·M·N·K summed over the dot ops of
    the TTGIR (one loop iteration, one program); `op_counts` holds every op name."""

    kernel: str
    arch: str
    status: Literal["ok", "infeasible"]
    num_warps: int
    num_stages: int
    reason: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    dot_flops: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelFeatures:
        if not isinstance(data, dict):
            raise TypeError(f"KernelFeatures.from_dict: data must be a dict, got {type(data).__name__}")
        return cls(**data)


def summarize(module: MlirModule) -> tuple[dict[str, int], int]:
    """(summary counts by OP_GROUPS, dot FLOPs) of a parsed TTGIR module."""
    names = module.op_counts()
    counts = {group: sum(names.get(n, 0) for n in ops) for group, ops in OP_GROUPS.items()}
    dot_flops = 0
    for op in module.find(*OP_GROUPS["dots"]):
        out, lhs = op.result_shape(), op.operand_shape(0)
        if len(out) >= 2 and lhs:
            dot_flops += 2 * out[-2] * out[-1] * lhs[-1] * (out[0] if len(out) == 3 else 1)
    return counts, dot_flops


def _compile(variant: KernelVariant, arch: str) -> KernelFeatures:
    def record(status: Literal["ok", "infeasible"], reason: str | None, **facts: Any) -> KernelFeatures:
        return KernelFeatures(variant.name, arch, status, variant.num_warps, variant.num_stages, reason, **facts)

    try:
        compiled = compile_kernel(variant, arch)
        registers, spill, shared = kernel_resources(compiled)
    except Exception as err:  # compile failures (out of shared memory, bad layouts, ptxas errors) are data
        return record("infeasible", f"{type(err).__name__}: {str(err)[:500]}")
    module = parse_module(compiled.asm["ttgir"])
    counts, dot_flops = summarize(module)
    # Triton compiles tiles that do not fit and refuses them only at launch ("out of resource: shared memory").
    limit = max_smem_per_block(arch)
    reason = f"needs {shared} B of shared memory, {arch} allows {limit} B per program" if shared > limit else None
    return record(
        "infeasible" if reason else "ok", reason, registers=registers, spill_bytes=spill, shared_bytes=shared,
        dot_flops=dot_flops, counts=counts, op_counts=dict(sorted(module.op_counts().items())),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ cache keys
def _loader_path(variant: KernelVariant) -> str:
    loader = variant.kernel
    return f"{loader.__module__}:{loader.__qualname__}"


def kernel_source_digest(kernel: Any) -> str:
    """SHA-256 of a @triton.jit kernel's source and of every @triton.jit helper its module defines or imports."""
    fn = kernel.fn
    parts = [inspect.getsource(fn)]
    for name, value in sorted(fn.__globals__.items()):
        helper = getattr(value, "fn", None)
        if callable(helper) and value is not kernel and name != fn.__name__:
            try:
                parts.append(f"{name}\n{inspect.getsource(helper)}")
            except (OSError, TypeError):
                continue
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def feature_key(variant: KernelVariant, arch: str) -> str:
    """Cache key of (kernel source, constexprs, integer specialization, launch options, arch, Triton version)."""
    import triton

    payload = {
        "source": kernel_source_digest(variant.kernel()),
        "loader": _loader_path(variant),
        "pointers": variant.pointers,
        "floats": list(variant.floats),
        "constexprs": {k: repr(v) for k, v in variant.constexprs.items()},
        "ints": variant.ints,
        "num_warps": variant.num_warps,
        "num_stages": variant.num_stages,
        "arch": arch,
        "triton": triton.__version__,
        "schema": SCHEMA_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- child process
def _variant_to_dict(variant: KernelVariant) -> dict[str, Any]:
    data = asdict(variant)
    data["kernel"] = _loader_path(variant)
    return data


def _variant_from_dict(data: dict[str, Any]) -> KernelVariant:
    module, _, qualname = data["kernel"].partition(":")
    loader = getattr(importlib.import_module(module), qualname)
    return KernelVariant(**{**data, "kernel": loader, "floats": tuple(data["floats"])})


def _compile_in_child(variant: KernelVariant, arch: str) -> KernelFeatures:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    request = json.dumps({"variant": _variant_to_dict(variant), "arch": arch})
    code = "from tilefuse.costmodel.features import child_main; child_main()"
    done = subprocess.run([sys.executable, "-c", code], input=request, env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"feature compile child failed ({done.returncode}): {done.stderr[-2000:]}")
    return KernelFeatures.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))


def child_main() -> None:
    """Entry point of the child process: one JSON request on stdin, the features as JSON on stdout's last line."""
    request = json.loads(sys.stdin.read())
    features = _compile(_variant_from_dict(request["variant"]), request["arch"])
    sys.stdout.write(json.dumps(features.to_dict()) + "\n")


# ----------------------------------------------------------------------------------------------- public entry
def kernel_features(variant: KernelVariant, arch: str = "sm_90", cache: FeatureCache | None = None) -> KernelFeatures:
    """Features of `variant` compiled for `arch` ("sm_80", "sm_90", ...), from the cache when present.

    `cache=None` uses the default cache; pass `FeatureCache(None)` to disable caching."""
    if arch not in ARCHES:
        raise ValueError(f"arch={arch!r}; supported: {sorted(ARCHES)}")
    if not isinstance(variant, KernelVariant):
        raise TypeError(f"variant must be a KernelVariant, got {type(variant).__name__}")
    cache = default_cache() if cache is None else cache
    key = feature_key(variant, arch)
    hit = cache.get(key)
    if hit is not None:
        return KernelFeatures.from_dict(hit)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    features = _compile_in_child(variant, arch) if interpreting else _compile(variant, arch)
    cache.put(key, features.to_dict())
    return features


def combine_features(parts: Sequence[KernelFeatures]) -> KernelFeatures:
    """One launch of several kernels (the attention backward's dK/dV and dQ): occupancy and spills are limited by
    the worst kernel, so registers, spill bytes and shared memory are the maxima; dot FLOPs and op counts add up.
    Infeasible (with the first reason) when any kernel is; the launch options are the first kernel's."""
    if not parts:
        raise ValueError("combine_features needs at least one KernelFeatures")
    if len(parts) == 1:
        return parts[0]
    first, failed = parts[0], [p for p in parts if not p.ok]

    def most(name: str) -> int | None:
        values = [v for v in (getattr(p, name) for p in parts) if v is not None]
        return max(values) if values else None

    def summed(name: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for part in parts:
            for key, count in getattr(part, name).items():
                total[key] = total.get(key, 0) + count
        return dict(sorted(total.items()))

    return KernelFeatures(
        "+".join(p.kernel for p in parts), first.arch, "infeasible" if failed else "ok", first.num_warps,
        first.num_stages, failed[0].reason if failed else None, most("registers"), most("spill_bytes"),
        most("shared_bytes"), sum(p.dot_flops for p in parts), summed("counts"), summed("op_counts"),
    )  # fmt: skip


def plan_features(plan: TiledPlan, arch: str = "sm_90", cache: FeatureCache | None = None) -> KernelFeatures:
    """Features of the kernels `plan` launches (`TiledPlan.variants`), combined into one launch's
    (`combine_features`) for the attention backward's two main kernels."""
    return combine_features([kernel_features(variant, arch, cache) for variant in plan.variants()])
