"""The tilefuse:: ops' arguments, written once: one record per op, from which everything else is derived.

torch.library needs a flat schema; its string, the binding of an op's arguments by name (implementations, fakes,
autograd, CUDA kernels) and the calls the passes and `tilefuse.ops` build all come from the records here. A leaf
(torch and tilefuse.specs only), so the passes import it without reaching kernels.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, TypeVar, get_args, get_origin, get_type_hints

import torch
from torch import Tensor

from ..specs import ROPE_NONE, AttentionSpec, NormSpec, eps_mode_code, rope_layout_code

# Attention dropout's rng is int64 [seed, offset] drawn uniformly from [0, RNG_HIGH): below 2^31, so a kernel can
# take either as int32 or int64, and offset + counter never overflows int64.
RNG_HIGH = 2**31 - 1

# Scalar arguments (attention scale and softcap, norm eps) are schema `Scalar`, not `float`: a compiled graph may
# pass a value computed from symbolic sizes, which a `float` argument would specialize (one recompile per value);
# the implementations convert it to a Python float first. `Annotated[T, "schema type"]` overrides the type a
# field's annotation would give.
SymScalar = Annotated[float, "Scalar"]

# A record field's Python type → its schema type (int is SymInt so sizes may stay symbolic).
_SCHEMA_TYPES: dict[Any, str] = {
    Tensor: "Tensor",
    Tensor | None: "Tensor?",
    bool: "bool",
    int: "SymInt",
    float: "float",
    torch.dtype: "ScalarType",
}


class AttnInputs(NamedTuple):
    """The tensors of one attention call: [B, H, N, D] q/k/v and the optional mask, ALiBi slopes, cos/sin."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None = None
    alibi_slopes: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    rng: Tensor | None = None  # int64 [seed, offset] of the dropout RNG (see reference.dropout_keep)


# The inputs attention_backward returns a gradient for, in its output order: all but rng.
GRAD_INPUTS = tuple(name for name in AttnInputs._fields if name != "rng")


class AttnFlags(NamedTuple):
    """The scalar arguments of one attention call, in the custom op's order (see AttentionSpec)."""

    scale: SymScalar
    causal: bool = False
    bottom_right: bool = False
    window: int = 0
    softcap: SymScalar = 0.0
    rope_layout: int = ROPE_NONE
    rotary_dim: int = 0
    dropout_p: float = 0.0

    @classmethod
    def from_spec(cls, spec: AttentionSpec, run_time: tuple[Any, Any] | None = None) -> AttnFlags:
        """The flags a site's Spec asks for; `run_time` replaces the Spec's (scale, softcap) when a graph computes
        them at run time (graph values, not floats)."""
        scale, softcap = run_time if run_time is not None else (spec.scale, spec.softcap or 0.0)  # softcap None: off
        rope = spec.rope
        return cls(
            scale, spec.causal, spec.align == "bottom_right", spec.window or 0, softcap,
            rope_layout_code(rope.layout if rope is not None else None), rope.rotary_dim if rope is not None else 0,
            spec.dropout_p,
        )  # fmt: skip


class RopeArgs(NamedTuple):
    """tilefuse::rope's inputs: rotate the first `rotary_dim` features of x (layout: specs.rope_layout_code)."""

    x: Tensor
    cos: Tensor
    sin: Tensor
    layout: int
    rotary_dim: int


class NormArgs(NamedTuple):
    """The arguments of the four norm ops; each op takes the fields it names (`norm_op`), the rest read as absent.

    `residual` is required where an op takes it (add_rms_norm, add_layer_norm); `eps_mode` indexes specs.EPS_MODES.
    """

    x: Tensor
    residual: Annotated[Tensor | None, "Tensor"]
    weight: Tensor | None
    bias: Tensor | None
    eps: SymScalar
    weight_offset: float = 0.0
    eps_mode: int = 0
    norm_scale: float = 1.0

    @classmethod
    def from_spec(cls, spec: NormSpec, tensors: Mapping[str, Any], eps: Any) -> NormArgs:
        """The arguments a site's Spec asks for: `tensors` (x, residual, weight, bias; graph values) and `eps`,
        the Spec's or a graph value computing it at run time."""
        mode = eps_mode_code(spec.eps_mode)
        return cls(**tensors, eps=eps, weight_offset=spec.weight_offset, eps_mode=mode, norm_scale=spec.norm_scale)


_Record = TypeVar("_Record", bound=tuple[Any, ...])


def pick(record: type[_Record], values: Mapping[str, Any]) -> _Record:
    """The `record` (a NamedTuple) of a bound op call's values by field name; a field the op does not take reads as
    its default (None without one)."""
    named: Any = record  # a NamedTuple class: _make skips keyword binding (this runs on every op call)
    return named._make([values.get(name, default) for name, default in _field_defaults(record)])


@functools.cache
def _field_defaults(record: type[tuple[Any, ...]]) -> tuple[tuple[str, Any], ...]:
    named: Any = record
    return tuple((name, named._field_defaults.get(name)) for name in named._fields)


def attention_records(values: Mapping[str, Any]) -> tuple[AttnInputs, AttnFlags]:
    """The inputs and flags of a bound attention (or attention_backward) call, its Scalars as Python floats."""
    flags = pick(AttnFlags, values)
    return pick(AttnInputs, values), flags._replace(scale=float(flags.scale), softcap=float(flags.softcap))


# ------------------------------------------------------------------------------------------ op signatures
def arg(name: str, schema_type: str, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """One op argument that no record holds (outputs fed back to a backward, layouts, options)."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=schema_type)


def _schema_type(hint: Any) -> str:
    if get_origin(hint) is Annotated:
        return str(get_args(hint)[1])
    return _SCHEMA_TYPES[hint]


def params_of(
    record: type[tuple[Any, ...]], *, only: Iterable[str] | None = None, without: Iterable[str] = ()
) -> tuple[inspect.Parameter, ...]:
    """A record's fields as op arguments, in field order: schema types from the annotations, record defaults."""
    hints = get_type_hints(record, include_extras=True)
    named: Any = record  # a NamedTuple class: its fields and their defaults
    defaults: dict[str, Any] = named._field_defaults
    chosen = [f for f in named._fields if (only is None or f in set(only)) and f not in set(without)]
    return tuple(arg(f, _schema_type(hints[f]), defaults.get(f, inspect.Parameter.empty)) for f in chosen)


OUT_ORDER = arg("out_order", "SymInt[]?", None)  # the output's dim order in memory (codegen/layouts.py)


@dataclass(frozen=True)
class OpSignature:
    """One tilefuse:: op's arguments in schema order (names, schema types, defaults) and its number of outputs."""

    name: str
    signature: inspect.Signature
    outputs: int

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(self.signature.parameters)

    @property
    def qualname(self) -> str:
        return f"tilefuse::{self.name}"

    @property
    def overload(self) -> torch._ops.OpOverload:
        """The registered op (torch.ops.tilefuse.<name>.default); codegen/custom_ops.py registers it."""
        return getattr(torch.ops.tilefuse, self.name).default

    def schema(self) -> str:
        """The torch.library schema, e.g. "(Tensor x, Tensor? weight, Scalar eps) -> Tensor"."""
        params = ", ".join(_schema_param(p) for p in self.signature.parameters.values())
        returns = "Tensor" if self.outputs == 1 else f"({', '.join(['Tensor'] * self.outputs)})"
        return f"({params}) -> {returns}"

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every argument of a call by name, defaults filled in (the dispatcher drops trailing defaults).

        Runs on every op call: the usual positional call is zipped with the names (a few µs), anything else goes
        through inspect.Signature.bind (~25 µs), which also raises the errors."""
        params = self._params
        if not kwargs and len(args) <= len(params):
            values = dict(zip(self.names, args, strict=False))
            for param in params[len(args) :]:
                if param.default is inspect.Parameter.empty:
                    break  # a required argument is missing: let Signature.bind say which
                values[param.name] = param.default
            else:
                return values
        bound = self.signature.bind(*args, **(kwargs or {}))
        bound.apply_defaults()
        return dict(bound.arguments)

    @functools.cached_property
    def _params(self) -> tuple[inspect.Parameter, ...]:
        return tuple(self.signature.parameters.values())

    def by_name(self, per_arg: Sequence[Any]) -> dict[str, Any]:
        """A value per argument (e.g. autograd's `needs_input_grad`) keyed by the argument's name; trailing
        arguments a call left out (the dispatcher drops those equal to their defaults) are absent."""
        return dict(zip(self.names, per_arg, strict=False))

    def per_arg(self, by_name: Mapping[str, Any]) -> tuple[Any, ...]:
        """One value per argument in schema order, None where `by_name` has none (e.g. gradients)."""
        return tuple(by_name.get(name) for name in self.names)

    def call_args(self, *records: Any, **values: Any) -> tuple[Any, ...]:
        """Positional arguments of a call from records (NamedTuples: the fields this op takes) and values by name
        (which override them): up to the last argument given, with defaults for those left out between."""
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise TypeError(f"{self.qualname} takes no argument(s) {unknown}")
        fields = {name: value for record in records for name, value in record._asdict().items() if name in self.names}
        given = fields | values
        last = max(i for i, name in enumerate(self.names) if name in given)
        return tuple(_value(p, given) for p in list(self.signature.parameters.values())[: last + 1])


def _value(param: inspect.Parameter, given: Mapping[str, Any]) -> Any:
    if param.name in given:
        return given[param.name]
    if param.default is inspect.Parameter.empty:
        raise TypeError(f"missing argument {param.name!r}")
    return param.default


def _schema_param(param: inspect.Parameter) -> str:
    text = f"{param.annotation} {param.name}"
    return text if param.default is inspect.Parameter.empty else f"{text}={param.default!r}"


def op_signature(
    name: str, params: Iterable[inspect.Parameter], outputs: int = 1, defaults_from: str | None = None
) -> OpSignature:
    """The op `name` over `params`; the schema gives defaults only from the argument `defaults_from` on (None: none),
    as it always has, whatever defaults the records hold for earlier fields."""
    ordered = list(params)
    names = [p.name for p in ordered]
    start = names.index(defaults_from) if defaults_from is not None else len(ordered)
    kept = [p if i >= start else p.replace(default=inspect.Parameter.empty) for i, p in enumerate(ordered)]
    return OpSignature(name, inspect.Signature(kept), outputs)


# ------------------------------------------------------------------------------------------------ the ops
_ATTN_TENSORS = params_of(AttnInputs, without=("rng",))  # the op takes rng after the flags
_ATTN_RNG = params_of(AttnInputs, only=("rng",))

ATTENTION = op_signature(
    "attention", (*_ATTN_TENSORS, *params_of(AttnFlags), *_ATTN_RNG, OUT_ORDER), 2, defaults_from="dropout_p"
)
# the gradients of GRAD_INPUTS (dq, dk, dv, dmask, dalibi_slopes, dcos, dsin) given the forward's (out, lse)
ATTENTION_BACKWARD = op_signature(
    "attention_backward",
    (
        arg("grad_out", "Tensor"), *_ATTN_TENSORS, arg("out", "Tensor"), arg("lse", "Tensor"), *params_of(AttnFlags),
        *_ATTN_RNG, arg("input_grads", "bool[]?", None), arg("grad_lse", "Tensor?", None),
    ),
    len(GRAD_INPUTS),
    defaults_from="dropout_p",
)  # fmt: skip

ROPE = op_signature("rope", (*params_of(RopeArgs), OUT_ORDER), defaults_from="out_order")
ROPE_BACKWARD = op_signature(
    "rope_backward", (arg("grad", "Tensor"), *params_of(RopeArgs, without=("x",)), arg("x_dtype", "ScalarType"))
)

_RMS_ONLY = ("weight_offset", "eps_mode", "norm_scale")
_EPS_PLACEMENT = ("eps_mode", "norm_scale")


def _norm_signature(rms: bool, residual: bool) -> OpSignature:
    name = ("add_" if residual else "") + ("rms_norm" if rms else "layer_norm")
    without = (() if residual else ("residual",)) + (("bias",) if rms else _RMS_ONLY)
    return op_signature(name, params_of(NormArgs, without=without), 2 if residual else 1, "eps_mode" if rms else None)


_NORMS = {(rms, residual): _norm_signature(rms, residual) for rms in (True, False) for residual in (False, True)}
NORM_BACKWARD = op_signature(
    "norm_backward",
    (
        arg("grad", "Tensor"), *params_of(NormArgs, without=("residual", "bias", *_EPS_PLACEMENT)), arg("rms", "bool"),
        *params_of(NormArgs, only=_EPS_PLACEMENT),
    ),
    3,
    defaults_from="eps_mode",
)  # fmt: skip


def norm_op(rms: bool, residual: bool) -> OpSignature:
    """rms_norm, layer_norm, add_rms_norm or add_layer_norm (`residual`: returns (norm(x + residual), x + residual))."""
    return _NORMS[(rms, residual)]


ALL_OPS = (ATTENTION, ATTENTION_BACKWARD, ROPE, ROPE_BACKWARD, *_NORMS.values(), NORM_BACKWARD)
