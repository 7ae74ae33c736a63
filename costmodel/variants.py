"""The kernels a TiledPlan launches (every kernel family: FA2 forward, split-KV decode, the attention backward's
dK/dV and dQ kernels, norm forward and backward, RoPE), as compile-check `KernelVariant`s with launch-like integer
specialization.

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
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, eps_mode_code

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


def _attention_consts(plan: TiledPlan, spec: AttentionSpec) -> dict[str, Any]:
    """The constexprs every attention kernel (forward, decode, backward) takes, as its launcher sets them."""
    from tilefuse.codegen.attention_fwd import MASK_ADDITIVE, MASK_BOOL, MASK_NONE

    block_m, block_n, block_d, block_dv = plan.blocks
    mask_kind = {"none": MASK_NONE, "additive": MASK_ADDITIVE}.get(spec.mask, MASK_BOOL)
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=spec.causal,
        USE_WINDOW=bool(spec.window), MASK_KIND=mask_kind,
        HAS_SOFTCAP=bool(spec.softcap), HAS_ALIBI=spec.alibi,
        INPUT_PRECISION="ieee" if spec.dtype.endswith("float32") else "tf32", UPCAST_DOT=False,
        ROPE_LAYOUT=_ROPE_LAYOUT[spec.rope.layout] if spec.rope else -1, HAS_DROPOUT=spec.dropout_p > 0,
        SKIP_TILES=spec.mask != "none",  # the launchers pass a mask's block list with every mask tensor
    )  # fmt: skip


def _attention_pointers(spec: AttentionSpec, names: str, fp32: str = "") -> dict[str, str]:
    """Pointer types: `names` in the Spec's dtype, `fp32` names fp32, plus the optional inputs (mask, ALiBi slopes,
    cos/sin, the dropout rng, the mask's block list)."""
    pointers = {name: _pointer(spec.dtype) for name in (*names.split(), "Cos", "Sin")}
    pointers |= {name: "*fp32" for name in (*fp32.split(), "Alibi")}
    pointers |= {"Mask": _pointer(spec.dtype) if spec.mask == "additive" else "*u8", "Rng": "*i64"}
    pointers |= {name: "*i32" for name in ("BlockIdx", "BlockCount", "BlockPrefix")}
    return pointers


def _launch_name(prefix: str, plan: TiledPlan) -> str:
    cfg = plan.config
    return f"{prefix}_{plan.blocks[0]}x{plan.blocks[1]}_w{cfg.num_warps}_s{cfg.num_stages}"


def _attention_variant(plan: TiledPlan, spec: AttentionSpec) -> compile_check.KernelVariant:
    from tilefuse.codegen.attention_fwd import scale_in_exp

    base = compile_check.attention_variant(spec.head_dim, spec.mask != "none", spec.rope is not None)
    consts: dict[str, Any] = {k: False for k in base.constexprs if k.startswith("HAS_")}
    consts.update(base.constexprs)
    consts.update(_attention_consts(plan, spec))
    consts["SCALE_IN_EXP"] = scale_in_exp(spec.scale, spec.softcap or 0.0, spec.alibi, consts["MASK_KIND"])
    pointers = dict(base.pointers) | _attention_pointers(spec, "Q K V Out")
    cfg = plan.config
    return dataclasses.replace(
        base, name=_launch_name(base.name, plan), pointers=pointers, constexprs=consts, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, ints=_attention_ints(spec),
    )  # fmt: skip


def _decode_variant(plan: TiledPlan, spec: AttentionSpec) -> compile_check.KernelVariant:
    """Phase 1 of split-KV decode (the split kernel; phase 2 is a fixed, small combine) at the plan's split layout."""
    layout = plan.decode_layout()
    ints = _attention_ints(spec) | {"kv_heads": int(spec.kv_heads or 1)} | layout._asdict()
    floats = ("qk_scale", "softcap_log2", "drop_p", "drop_scale")
    name = _launch_name(f"attention_decode_d{spec.head_dim}", plan) + f"_splits{layout.num_splits}"
    return compile_check.KernelVariant(
        name, compile_check._decode_split, _attention_pointers(spec, "Q K V", "Acc Stat"), floats,
        _attention_consts(plan, spec), plan.config.num_warps, plan.config.num_stages, ints,
    )  # fmt: skip


def _backward_variants(plan: TiledPlan, spec: AttentionSpec) -> tuple[compile_check.KernelVariant, ...]:
    """The dK/dV and the dQ kernel of the attention backward, both at the plan's knobs (as the launcher runs them
    when it is given knobs); the small preprocess kernel is left out."""
    from tilefuse.codegen.attention_args import RopeArgs, rope_swap_span

    rope = RopeArgs(None, None, (), (), spec.rope.rotary_dim if spec.rope else 0, _ROPE_LAYOUT[spec.rope.layout]
                    if spec.rope else -1)  # fmt: skip
    consts = _attention_consts(plan, spec) | {"SWAP_SPAN": rope_swap_span(rope)}
    pointers = _attention_pointers(spec, "Q K V DO DQ DK DV", "Lse Delta")
    ints = compile_check.backward_ints(_attention_ints(spec))
    floats = ("sm_scale", "qk_scale", "softcap_log2", "drop_p", "drop_scale")
    cfg = plan.config
    kernels = (("dkdv", compile_check._attention_bwd_dkdv), ("dq", compile_check._attention_bwd_dq))
    variants = []
    for kind, loader in kernels:
        name = _launch_name(f"attention_bwd_{kind}_d{spec.head_dim}", plan)
        variants.append(compile_check.KernelVariant(name, loader, pointers, floats, consts, cfg.num_warps,
                                                    cfg.num_stages, ints))  # fmt: skip
    return tuple(variants)


def _constexpr_names(variant: compile_check.KernelVariant) -> list[str]:
    from tilefuse.codegen import emit

    return list(emit.constexpr_names(variant.kernel()))


def _norm_variant(plan: TiledPlan, spec: NormSpec) -> compile_check.KernelVariant:
    (block,) = plan.blocks
    pointers = {n: _pointer(spec.dtype) for n in ("X", "RES", "W", "B", "SUM")}
    pointers.update(Y=_pointer(spec.out_dtype), MEAN="*fp32", RSTD="*fp32")
    consts = {_norm_size(plan): block, "RMS": spec.norm == "rmsnorm", "HAS_WEIGHT": spec.has_weight,
              "HAS_BIAS": spec.has_bias, "HAS_RESIDUAL": spec.residual,
              "EPS_MODE": eps_mode_code(spec.eps_mode)}  # fmt: skip
    name = f"{spec.norm}_fwd_width{spec.width}_w{plan.config.num_warps}{_chunk_suffix(plan)}"
    ints = {"width": spec.width}
    kernel = compile_check._norm_fwd_chunked if plan.norm_chunked else compile_check._norm_fwd
    return compile_check.KernelVariant(
        name, kernel, pointers, ("eps", "weight_offset", "norm_scale"), consts, plan.config.num_warps, ints=ints
    )


def _norm_size(plan: TiledPlan) -> str:
    """The constexpr holding a norm plan's row block: BLOCK (whole rows) or CHUNK (the chunked kernels)."""
    return "CHUNK" if plan.norm_chunked else "BLOCK"


def _chunk_suffix(plan: TiledPlan) -> str:
    return f"_c{plan.blocks[0]}" if plan.norm_chunked else ""


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


def _norm_backward_variant(plan: TiledPlan, spec: NormSpec) -> compile_check.KernelVariant:
    (block,) = plan.blocks
    (programs,) = plan.grid
    rows = math.prod(int(d or 1) for d in spec.shape[:-1])
    pointers = {n: _pointer(spec.dtype) for n in ("G", "X", "W", "DX")}
    pointers |= {n: "*fp32" for n in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")}
    consts = {_norm_size(plan): block, "RMS": spec.norm == "rmsnorm", "HAS_WEIGHT": spec.has_weight,
              "EPS_MODE": eps_mode_code(spec.eps_mode)}  # fmt: skip
    ints = {"rows": rows, "width": spec.width, "rows_per_program": -(-rows // programs)}
    name = f"{spec.norm}_bwd_width{spec.width}_w{plan.config.num_warps}_p{programs}{_chunk_suffix(plan)}"
    kernel = compile_check._norm_bwd_chunked if plan.norm_chunked else compile_check._norm_bwd
    return compile_check.KernelVariant(
        name, kernel, pointers, ("weight_offset", "eps", "norm_scale"), consts, plan.config.num_warps, ints=ints
    )


def plan_variants(plan: TiledPlan) -> tuple[compile_check.KernelVariant, ...]:
    """Every kernel of `plan`'s family whose resources depend on the plan's knobs, main kernel first: the attention
    backward's dK/dV and dQ kernels; one kernel for every other family."""
    if not isinstance(plan, TiledPlan):
        raise TypeError(f"plan must be a TiledPlan, got {type(plan).__name__}")
    spec, family = plan.spec, plan.kernel_family
    if isinstance(spec, AttentionSpec):
        if family == "attention_backward":
            return _backward_variants(plan, spec)
        return (_decode_variant(plan, spec) if family == "attention_decode" else _attention_variant(plan, spec),)
    if isinstance(spec, NormSpec):
        return (_norm_backward_variant(plan, spec) if family == "norm_backward" else _norm_variant(plan, spec),)
    return (_rope_variant(plan, spec),)


def variant_for_plan(plan: TiledPlan) -> compile_check.KernelVariant:
    """The main kernel `plan` launches, with the plan's knobs and launch-like ints: the FA2 forward, the split-KV
    decode kernel, the attention backward's dK/dV kernel (`plan_variants` has its dQ kernel too), the norm forward
    or backward, RoPE."""
    return plan_variants(plan)[0]
