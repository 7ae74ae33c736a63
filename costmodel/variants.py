"""The kernel a TiledPlan launches, as a compile-check `KernelVariant` with launch-like integer specialization.

Pointer element types follow the Spec's dtype; integer arguments get the values a launch on contiguous tensors
would pass, so the compile sees the same divisibility facts (and makes the same vectorization and pipelining
choices) as the real launch. Constexprs the plan does not decide keep the compile-check defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tilefuse.codegen import compile_check
from tilefuse.codegen.plan import TiledPlan
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec

_POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
_ROPE_LAYOUT = {"rotate_half": 0, "interleaved": 1}


def _pointer(dtype: str) -> str:
    name = dtype.removeprefix("torch.")
    if name not in _POINTER:
        raise ValueError(f"dtype {dtype!r} has no kernel; expected one of {sorted(_POINTER)}")
    return _POINTER[name]


def _strides(shape: tuple[int, ...], broadcast: tuple[bool, ...] | None = None) -> list[int]:
    """Strides of a contiguous tensor of `shape`; dims flagged in `broadcast` get stride 0 (an expanded view)."""
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return [0 if b else s for s, b in zip(strides, broadcast, strict=True)] if broadcast else strides


def _named(names: str, strides: list[int]) -> dict[str, int]:
    return {f"stride_{n}": s for n, s in zip(names.split(), strides, strict=True)}


def _attention_ints(spec: AttentionSpec) -> dict[str, int]:
    b, hq, hkv = int(spec.batch or 1), int(spec.q_heads or 1), int(spec.kv_heads or 1)
    nq, nk, d, dv = int(spec.q_len or 1), int(spec.kv_len or 1), spec.head_dim, spec.v_head_dim
    ints = {
        **_named("qb qh qm qd", _strides((b, hq, nq, d))),
        **_named("kb kh kn kd", _strides((b, hkv, nk, d))),
        **_named("vb vh vn vd", _strides((b, hkv, nk, dv))),
        **_named("ob oh om od", _strides((b, hq, nq, dv))),
        "num_q_heads": hq, "group": spec.gqa_group, "q_len": nq, "kv_len": nk, "head_dim": d, "head_dim_v": dv,
        "rotary_dim": spec.rope.rotary_dim if spec.rope else 0, "window": spec.window or 0,
        "pos_offset": nk - nq if spec.align == "bottom_right" else 0,
    }  # fmt: skip
    if spec.mask != "none":
        shape = tuple(int(s or 1) for s in spec.mask_shape) or (b, hq, nq, nk)
        shape = (1,) * (4 - len(shape)) + shape
        ints.update(_named("mb mh mm mn", _strides(shape, tuple(s == 1 for s in shape))))
    if spec.rope:  # a [N, rotary_dim] table broadcast over batch and heads
        table = _strides((1, 1, max(nq, nk), spec.rope.rotary_dim), (True, True, False, False))
        ints.update(_named("cb ch cn cd", table) | _named("sb sh sn sd", table))
    return ints


def _attention_variant(plan: TiledPlan, spec: AttentionSpec) -> compile_check.KernelVariant:
    from tilefuse.codegen.attention_fwd import MASK_ADDITIVE, MASK_BOOL, MASK_NONE

    base = compile_check.attention_variant(spec.head_dim, spec.mask != "none", spec.rope is not None)
    block_m, block_n, block_d, block_dv = plan.blocks
    mask_kind = {"none": MASK_NONE, "additive": MASK_ADDITIVE}.get(spec.mask, MASK_BOOL)
    consts: dict[str, Any] = {k: False for k in base.constexprs if k.startswith("HAS_")}
    consts.update(base.constexprs)
    consts.update(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=spec.causal,
        USE_WINDOW=bool(spec.window), MASK_KIND=mask_kind, HAS_SOFTCAP=bool(spec.softcap), HAS_ALIBI=spec.alibi,
        INPUT_PRECISION="ieee" if spec.dtype.endswith("float32") else "tf32", UPCAST_DOT=False,
        ROPE_LAYOUT=_ROPE_LAYOUT[spec.rope.layout] if spec.rope else -1,
    )  # fmt: skip
    if "HAS_DROPOUT" in _constexpr_names(base):
        consts["HAS_DROPOUT"] = spec.dropout_p > 0
    pointers = dict(base.pointers)
    for name in ("Q", "K", "V", "Out", "Cos", "Sin"):
        pointers[name] = _pointer(spec.dtype)
    if spec.mask == "additive":
        pointers["Mask"] = _pointer(spec.dtype)
    cfg = plan.config
    name = f"{base.name}_{block_m}x{block_n}_w{cfg.num_warps}_s{cfg.num_stages}"
    return dataclasses.replace(
        base, name=name, pointers=pointers, constexprs=consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        ints=_attention_ints(spec),
    )  # fmt: skip


def _constexpr_names(variant: compile_check.KernelVariant) -> list[str]:
    from tilefuse.codegen import emit

    return list(emit.constexpr_names(variant.kernel()))


def _norm_variant(plan: TiledPlan, spec: NormSpec) -> compile_check.KernelVariant:
    (block,) = plan.blocks
    pointers = {n: _pointer(spec.dtype) for n in ("X", "RES", "W", "B", "SUM")}
    pointers.update(Y=_pointer(spec.out_dtype), MEAN="*fp32", RSTD="*fp32")
    consts = dict(
        BLOCK=block, RMS=spec.norm == "rmsnorm", HAS_WEIGHT=spec.has_weight, HAS_BIAS=spec.has_bias,
        HAS_RESIDUAL=spec.residual,
    )  # fmt: skip
    name = f"{spec.norm}_fwd_width{spec.width}_w{plan.config.num_warps}"
    return compile_check.KernelVariant(
        name, compile_check._norm_fwd, pointers, ("eps", "weight_offset"), consts, plan.config.num_warps,
        ints={"width": spec.width},
    )  # fmt: skip


def _rope_variant(plan: TiledPlan, spec: RopeSpec) -> compile_check.KernelVariant:
    block_rows, block_half, block_tail = plan.blocks
    pointers = {n: _pointer(spec.dtype) for n in ("X", "COS", "SIN", "Y")}
    consts = dict(
        BLOCK_ROWS=block_rows, BLOCK_HALF=block_half, BLOCK_TAIL=block_tail, LAYOUT=_ROPE_LAYOUT[spec.layout],
        BACKWARD=False, HAS_TAIL=spec.rotary_dim < spec.head_dim,
    )  # fmt: skip
    rows = math.prod(int(d or 1) for d in spec.shape[:-1])
    ints = {"rows": rows, "head_dim": spec.head_dim, "half": spec.rotary_dim // 2}
    name = f"rope_{spec.layout}_d{spec.head_dim}_r{spec.rotary_dim}_rows{block_rows}_w{plan.config.num_warps}"
    return compile_check.KernelVariant(
        name, compile_check._rope, pointers, (), consts, plan.config.num_warps, ints=ints
    )


def variant_for_plan(plan: TiledPlan) -> compile_check.KernelVariant:
    """The forward kernel `plan` launches: attention at the plan's blocks/warps/stages; norm and RoPE at the blocks
    and warps their launchers pick (their TileConfig is not used by the launchers)."""
    if not isinstance(plan, TiledPlan):
        raise TypeError(f"plan must be a TiledPlan, got {type(plan).__name__}")
    spec = plan.spec
    if isinstance(spec, AttentionSpec):
        return _attention_variant(plan, spec)
    if isinstance(spec, NormSpec):
        return _norm_variant(plan, spec)
    return _rope_variant(plan, spec)
