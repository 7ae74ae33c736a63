"""Specs: the frozen, hashable, JSON-serializable description of one fused site.

Passes produce a Spec for every site they rewrite; codegen, the cost model and the autotuner consume it. Nothing
downstream looks at the FX graph again, so a Spec must say everything a kernel needs to know.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

# A dimension is an int when static and None when the captured graph treats it as dynamic.
Dim = int | None
Shape = tuple[Dim, ...]

RopeLayout = Literal["rotate_half", "interleaved"]
MaskKind = Literal["none", "additive", "boolean", "key_padding"]
CausalAlign = Literal["top_left", "bottom_right"]

EpsMode = Literal["mean_square", "clamp_norm", "add_norm"]

# The integer codes ops and kernels take for these enums are their places in these tuples (ROPE_NONE: no RoPE).
ROPE_LAYOUTS: tuple[RopeLayout, ...] = get_args(RopeLayout)  # rotate_half = 0, interleaved = 1
ROPE_NONE = -1
EPS_MODES: tuple[EpsMode, ...] = get_args(EpsMode)  # the norm ops' and kernels' eps_mode code indexes this
MASK_KINDS: tuple[MaskKind, ...] = get_args(MaskKind)
# The attention kernels' MASK_KIND constexpr: no mask, a keep-mask (bool / key padding, loaded as uint8), additive.
KERNEL_MASK_NONE, KERNEL_MASK_BOOL, KERNEL_MASK_ADDITIVE = 0, 1, 2


def rope_layout_code(layout: str | None) -> int:
    """The integer the RoPE ops and kernels take for a layout name (its place in ROPE_LAYOUTS; None: ROPE_NONE)."""
    if layout is None:
        return ROPE_NONE
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"RoPE layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    return ROPE_LAYOUTS.index(layout)


def rope_layout_name(code: int) -> RopeLayout:
    """The layout name of a RoPE layout code (the inverse of `rope_layout_code` for a real layout), else ValueError."""
    if not 0 <= code < len(ROPE_LAYOUTS):
        raise ValueError(f"RoPE layout code must index {ROPE_LAYOUTS}, got {code}")
    return ROPE_LAYOUTS[code]


def kernel_mask_kind(mask: str) -> int:
    """The attention kernels' MASK_KIND for a Spec's mask kind (boolean and key-padding masks load as keep-masks)."""
    if mask not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {mask!r}")
    return {"none": KERNEL_MASK_NONE, "additive": KERNEL_MASK_ADDITIVE}.get(mask, KERNEL_MASK_BOOL)


def check_eps_mode(mode: str) -> EpsMode:
    """`mode` when it names an eps placement (NormSpec.eps_mode), else ValueError."""
    if mode not in EPS_MODES:
        raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {mode!r}")
    return mode


def eps_mode_code(mode: str) -> int:
    """The integer the norm ops and kernels take for `mode`: its place in EPS_MODES."""
    return EPS_MODES.index(check_eps_mode(mode))


def eps_mode_name(code: int) -> EpsMode:
    """The eps placement an integer code stands for (the inverse of `eps_mode_code`), else ValueError."""
    if not 0 <= code < len(EPS_MODES):
        raise ValueError(f"eps_mode code must index {EPS_MODES}, got {code}")
    return EPS_MODES[code]


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding over the first `rotary_dim` features of the last axis.

    `rotate_half` pairs feature i with i + rotary_dim/2 (Llama, NeoX); `interleaved` pairs 2i with 2i+1 (GPT-J,
    and the complex-multiply spelling after conversion). cos/sin have `rotary_dim` features.
    """

    layout: RopeLayout
    rotary_dim: int
    head_dim: int
    shape: Shape = ()
    dtype: str = "float32"
    source: str = "rotate_half"  # how the model spelled it: rotate_half, interleaved, complex

    kind: Literal["rope"] = "rope"

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True)
class AttentionSpec:
    """softmax(scale * Q Kᵀ [softcap] [+ alibi] [+ mask]) V on [batch, heads, seq, head_dim] tensors.

    Causal and window masks are keyed on positions: with `align="bottom_right"` query i sits at position
    i + (kv_len - q_len), with `"top_left"` at position i. A key j is kept when j <= pos(i) (causal) and
    pos(i) - j < window (window, when set). The window bounds only how far back a query looks: with causal it is
    Mistral's / HF's sliding window (`kv_idx > q_idx - window`); without causal, later keys stay visible
    (FlashAttention's window_size=(window - 1, -1)); a symmetric window is a data mask, not this field. Fully
    masked rows produce zeros.

    `scale` may be any float, 0 and negative included. `softcap` is None (off) or > 0. A field named in
    `dynamic_scalars` ("scale", "softcap") is a run-time value (computed from symbolic sizes): the op receives it
    on each call, and the Spec holds the value seen at capture, an example for the cost model only.

    `sinks` (GPT-OSS): each row's softmax also covers one sink logit whose column is then dropped; the op runs
    plain attention and the graph rescales its output by sigmoid(lse - sink).
    """

    batch: Dim
    q_heads: Dim
    kv_heads: Dim
    q_len: Dim
    kv_len: Dim
    head_dim: int
    v_head_dim: int
    dtype: str
    scale: float
    causal: bool = False
    align: CausalAlign = "top_left"
    window: int | None = None
    softcap: float | None = None
    alibi: bool = False
    mask: MaskKind = "none"
    mask_shape: Shape = ()
    gqa_group: int = 1
    dropout_p: float = 0.0
    rope: RopeSpec | None = None
    source: str = "matmul"  # how the model spelled it: matmul chain or an SDPA variant
    dynamic_scalars: tuple[str, ...] = ()
    sinks: bool = False  # GPT-OSS sinks: out · sigmoid(lse - sink) per row, an epilogue outside the kernel

    kind: Literal["attention"] = "attention"

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True)
class NormSpec:
    """RMSNorm or LayerNorm over the trailing `width` features, optionally after a fused residual add.

    `weight_offset` is 1.0 for Gemma's `x * (1 + weight)` form. With `residual` the op computes
    s = x + residual, returns (norm(s), s). `compute_dtype` is the dtype statistics are taken in. With "eps" in
    `dynamic_scalars` eps is a run-time value and `eps` holds the value seen at capture (see AttentionSpec).

    `eps_mode` says where eps enters, with stat = norm_scale · sqrt(mean(x̂²)) (x̂: x, or x - mean for LayerNorm;
    norm_scale = sqrt(width) makes stat the L2 norm): "mean_square" rstd = 1/sqrt(stat² + eps) (RMSNorm,
    LayerNorm), "clamp_norm" rstd = 1/max(stat, eps) (F.normalize), "add_norm" rstd = 1/(stat + eps)
    (`x / (norm + eps)`). The normalized value is x̂ · rstd.
    """

    norm: Literal["rmsnorm", "layernorm"]
    width: int
    shape: Shape
    dtype: str
    eps: float
    has_weight: bool = True
    has_bias: bool = False
    weight_offset: float = 0.0
    residual: bool = False
    compute_dtype: str = "float32"
    out_dtype: str = "float32"
    dynamic_scalars: tuple[str, ...] = ()
    eps_mode: EpsMode = "mean_square"
    norm_scale: float = 1.0

    @property
    def kind(self) -> str:
        return self.norm

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out["kind"] = self.norm
        return out


Spec = AttentionSpec | NormSpec | RopeSpec


def _to_dict(spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = _to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def spec_to_json(spec: Spec) -> str:
    """Canonical JSON (sorted keys) of a Spec; equal Specs give equal strings."""
    return json.dumps(spec.to_dict(), sort_keys=True)


def spec_from_dict(data: dict[str, Any]) -> Spec:
    """Inverse of `Spec.to_dict`; raises ValueError on an unknown kind."""
    if not isinstance(data, dict):
        raise TypeError(f"spec_from_dict: data must be a dict, got {type(data).__name__}")
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind == "attention":
        rope = fields.get("rope")
        fields["rope"] = spec_from_dict(rope) if rope is not None else None
        return AttentionSpec(**_tuplify(fields))
    if kind == "rope":
        return RopeSpec(**_tuplify(fields))
    if kind in ("rmsnorm", "layernorm"):
        return NormSpec(**_tuplify(fields))
    raise ValueError(f"spec_from_dict: unknown kind {kind!r}; expected attention, rope, rmsnorm or layernorm")


def _tuplify(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
