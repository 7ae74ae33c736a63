"""Launch keys: what a launcher can see of one launch (its kernel family, the flags that select the kernel variant,
sizes bucketed like tuning keys), computed alike from a site's Spec at compile time (`spec_launch_key`) and from the
tensors at launch time (codegen/gpu.py), so a config chosen for a site reaches its launches with one dict lookup.
A dynamic dim buckets to "dyn" on the Spec side and never matches a launch: such sites keep the launcher defaults.
"""

from __future__ import annotations

import math
from typing import Any

from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

from .keys import bucket_dim

LaunchKey = tuple[Any, ...]
_ROPE_LAYOUTS = {"rotate_half": 0, "interleaved": 1}  # codegen.reference.ROPE_ROTATE_HALF / ROPE_INTERLEAVED


def _dtype(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def attention_key(
    kind: str, head_dim: int, v_head_dim: int, dtype: object, group: int, q_len: int | None, kv_len: int | None,
    causal: bool, window: bool, softcap: bool, alibi: bool, mask: bool, rope: bool, dropout: bool,
) -> LaunchKey:  # fmt: skip
    """An attention launch of kernel family `kind` ("attention", "attention_decode", "attention_backward")."""
    return (kind, head_dim, v_head_dim, _dtype(dtype), group, bucket_dim(q_len), bucket_dim(kv_len), causal, window,
            softcap, alibi, mask, rope, dropout)  # fmt: skip


def norm_key(
    kind: str, rms: bool, width: int, rows: int | None, dtype: object, has_weight: bool, has_bias: bool,
    residual: bool,
) -> LaunchKey:  # fmt: skip
    """A norm launch of family "norm" or "norm_backward" (the backward kernel reads neither bias nor residual)."""
    if kind == "norm_backward":
        has_bias = residual = False
    return (kind, rms, width, bucket_dim(rows), _dtype(dtype), has_weight, has_bias, residual)


def rope_key(layout: int, head_dim: int, rotary_dim: int, rows: int | None, dtype: object) -> LaunchKey:
    """A RoPE launch, forward or backward (both run the one kernel with the family "rope" knobs)."""
    return ("rope", layout, head_dim, rotary_dim, bucket_dim(rows), _dtype(dtype))


def _rows(shape: tuple[int | None, ...]) -> int | None:
    if not shape or None in shape[:-1]:
        return None
    return math.prod(int(d) for d in shape[:-1] if d is not None)


def spec_launch_key(spec: Spec, kind: str) -> LaunchKey | None:
    """The launch key of `spec`'s kernel family `kind`, or None when the Spec cannot have one (no shape)."""
    if isinstance(spec, AttentionSpec):
        return attention_key(
            kind, spec.head_dim, spec.v_head_dim, spec.dtype, spec.gqa_group, spec.q_len, spec.kv_len, spec.causal,
            bool(spec.window), bool(spec.softcap), spec.alibi, spec.mask != "none", spec.rope is not None,
            spec.dropout_p > 0,
        )  # fmt: skip
    if not spec.shape:
        return None
    if isinstance(spec, NormSpec):
        return norm_key(kind, spec.norm == "rmsnorm", spec.width, _rows(spec.shape), spec.dtype, spec.has_weight,
                        spec.has_bias, spec.residual)  # fmt: skip
    if isinstance(spec, RopeSpec):
        return rope_key(_ROPE_LAYOUTS[spec.layout], spec.head_dim, spec.rotary_dim, _rows(spec.shape), spec.dtype)
    return None
