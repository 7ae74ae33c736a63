"""Recognize ALiBi: an additive bias slope[b, h] · c · (key index) plus anything constant along each score row.

Softmax is shift-invariant along a row, so such a bias equals the kernel's slope · (k - q_pos) up to a per-row
constant, and the kernel needs only the [H] (or [B, H]) slopes instead of an N×N bias. Positions are proven from
index arithmetic, or from their value when computed from constants alone; on a causal site the symmetric
-slope·|q - k| (x-transformers) is such a bias on every kept score. A bias that looks like ALiBi but cannot be
proven (symmetric distances without a causal mask, positions computed from data, trainable slopes) stays an
additive mask, and the reason is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from .graph import arg, aten, insert_call, is_op, may_require_grad, tensor_val
from .positions import (
    CASTS,
    SHAPE_VIEWS,
    Affine,
    constant_value,
    index_expr,
    is_full_slice,
    non_unit_axes,
    same_size,
    shape_of,
    slice_dim,
    structure_holds,
)

# Axis roles: batch, head, query, key; "BH" is batch and head folded into one axis (3-D bmm spellings) and "X" a
# size-1 axis a view or squeeze made, which means nothing.
Roles = tuple[str, ...]
SCORE_ROLES: Roles = ("B", "H", "Q", "K")
FOLDED_ROLES: Roles = ("BH", "Q", "K")
BATCH_ROLES = ("B", "H")


@dataclass(frozen=True)
class AlibiTerm:
    """The bias is `coef · slopes · key index` plus a per-row constant; `roles` names each axis of `slopes`, and
    `head_pad` (before, after) counts heads padded with a zero bias around those the slopes cover."""

    slopes: fx.Node
    roles: Roles
    coef: float
    head_pad: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class NotAlibi:
    """The bias is a per-head factor times positions, but not provably ALiBi."""

    reason: str


@dataclass(frozen=True)
class _Frame:
    """A node that equals `coef ·` the bias once its axes (named by `roles`) are broadcast to the scores."""

    node: Any  # an fx.Node; an op argument until checked
    roles: Roles
    coef: float = 1.0
    head_pad: tuple[int, int] = (0, 0)
    aligned: bool = True  # the node's query and key indices are the scores' (no slice moved them)


def match_alibi(
    bias: Any, roles: Roles, heads: int | None, kv_len: Any, upper: int | None = None
) -> AlibiTerm | NotAlibi | None:
    """Read `bias` (axes right-aligned to `roles`) as ALiBi; None when it is no per-head × positions product.

    `upper`: the site's masks keep only k - q <= upper (a causal mask), so the bias need be ALiBi only there: the
    symmetric -slope·|q - k| of a causal site is slope·(k - q) up to a per-row constant on every kept score."""
    shape = shape_of(bias)
    if shape is None or not 0 < len(shape) <= len(roles):
        return None
    frame = _Frame(bias, roles[len(roles) - len(shape) :])
    if frame.roles[-1] != "K" or not same_size(shape[-1], kv_len):
        return None  # broadcast along the keys: constant per row, nothing for ALiBi to carry
    inner = _see_through(frame, heads)
    if not is_op(inner.node, aten.mul) or not structure_holds(inner.node):
        return None
    a, b = inner.node.args[:2]
    verdicts = [_product(inner, s, p, upper) for s, p in ((a, b), (b, a))]
    proven = [v for v in verdicts if isinstance(v, AlibiTerm)]
    return proven[0] if proven else next((v for v in verdicts if v is not None), None)


# ---------------------------------------------------------------------------- ops that keep the bias' meaning
def _see_through(frame: _Frame, heads: int | None) -> _Frame:
    """Walk inward through casts, negation, size-1 views, row-preserving slices and head-folding reshapes."""
    while True:
        node = frame.node
        if not structure_holds(node):  # written in place after it was made: its op no longer says what it holds
            return frame
        if is_op(node, *CASTS) and _is_float(node):  # a float cast only rounds the bias
            inner: _Frame | None = replace(frame, node=node.args[0])
        elif is_op(node, aten.neg):
            inner = _Frame(node.args[0], frame.roles, -frame.coef)
        elif is_op(node, aten.slice):
            inner = _slice_frame(frame)
        elif is_op(node, aten.unsqueeze):
            inner = _unsqueeze_frame(frame)
        elif is_op(node, *SHAPE_VIEWS, aten.repeat):
            inner = _unfold_frame(frame, heads) or _unit_view_frame(frame)
        elif is_op(node, aten.constant_pad_nd, aten.pad):
            inner = _pad_frame(frame)
        elif is_op(node, aten.expand):  # broadcasting keeps each axis' role (new axes are leading)
            rank = len(shape_of(node.args[0]) or ())
            inner = replace(frame, node=node.args[0], roles=frame.roles[len(frame.roles) - rank :]) if rank else None
        else:
            inner = None
        if inner is None or not isinstance(inner.node, fx.Node):
            return frame
        frame = inner


def _is_float(node: fx.Node) -> bool:
    val = tensor_val(node)
    return val is not None and val.dtype.is_floating_point


def _slice_frame(frame: _Frame) -> _Frame | None:
    """Slicing queries only changes a per-row constant; a unit-step key slice shifts k by a constant."""
    node = frame.node
    dim = slice_dim(node)
    if dim is None or dim >= len(frame.roles):
        return None
    role, step = frame.roles[dim], arg(node, 4, "step", 1)
    if is_full_slice(node):
        return replace(frame, node=node.args[0])
    if role == "Q" or (role == "K" and step == 1):
        return replace(frame, node=node.args[0], aligned=False)
    return None


def _pad_frame(frame: _Frame) -> _Frame | None:
    """Zero padding of the head axis (x-transformers pads heads beyond its ALiBi heads with a zero bias); padding
    of zero width anywhere is no padding."""
    node = frame.node
    pads, mode, value = node.args[1], arg(node, 2, "mode", "constant"), arg(node, 3, "value", 0.0)
    if is_op(node, aten.constant_pad_nd):
        mode, value = "constant", arg(node, 2, "value", 0.0)
    if mode != "constant" or value not in (0, 0.0, None) or not isinstance(pads, (list, tuple)):
        return None
    rank, head_pad = len(frame.roles), frame.head_pad
    for i in range(0, len(pads), 2):
        before, after = pads[i], pads[i + 1]
        if (before, after) == (0, 0):
            continue
        axis = rank - 1 - i // 2
        if not (isinstance(before, int) and isinstance(after, int)) or axis < 0 or frame.roles[axis] != "H":
            return None
        head_pad = (head_pad[0] + before, head_pad[1] + after)
    if min(head_pad) < 0:
        return None  # negative padding crops heads
    return replace(frame, node=node.args[0], head_pad=head_pad)


def _unsqueeze_frame(frame: _Frame) -> _Frame | None:
    dim: Any = frame.node.args[1]
    rank = len(frame.roles)
    dim = dim + rank if dim < 0 else dim
    return _Frame(frame.node.args[0], frame.roles[:dim] + frame.roles[dim + 1 :], frame.coef)


def _unit_view_frame(frame: _Frame) -> _Frame | None:
    """A view or squeeze that only inserts or drops size-1 axes: the other axes keep their roles, in order."""
    node = frame.node
    if is_op(node, aten.repeat):
        return None
    roles = _unit_view_roles(shape_of(node.args[0]), shape_of(node), frame.roles)
    return _Frame(node.args[0], roles, frame.coef) if roles is not None else None


def _unit_view_roles(src: tuple[Any, ...] | None, out: tuple[Any, ...] | None, roles: Roles) -> Roles | None:
    if src is None or out is None:
        return None
    src_axes, out_axes = non_unit_axes(src), non_unit_axes(out)
    if len(src_axes) != len(out_axes):
        return None
    moved = dict(zip(src_axes, out_axes, strict=True))
    if not all(same_size(src[a], out[b]) for a, b in moved.items()):
        return None
    return tuple(roles[moved[a]] if a in moved else "X" for a in range(len(src)))


def _unfold_frame(frame: _Frame, heads: int | None) -> _Frame | None:
    """Undo folding heads into the batch: reshape [B, H, ...] -> [B*H, ...], or repeat([H, ...], [B, 1, ...])."""
    if heads is None or "BH" not in frame.roles:
        return None
    node, axis = frame.node, frame.roles.index("BH")
    src, out = shape_of(node.args[0]), shape_of(node)
    if src is None or out is None:
        return None
    if is_op(node, aten.repeat):
        tiled = _repeat_roles(src, out, node.args[1], axis, heads)
        return _Frame(node.args[0], frame.roles[:axis] + tiled + frame.roles[axis + 1 :], frame.coef) if tiled else None
    if len(src) <= axis + 1 or not same_size(src[axis + 1], heads) or not same_size(src[axis] * heads, out[axis]):
        return None
    split = (*out[:axis], src[axis], heads, *out[axis + 1 :])
    roles = _unit_view_roles(src, split, frame.roles[:axis] + BATCH_ROLES + frame.roles[axis + 1 :])
    return _Frame(node.args[0], roles, frame.coef) if roles is not None else None


def _repeat_roles(src: tuple[Any, ...], out: tuple[Any, ...], repeats: Any, axis: int, heads: int) -> Roles:
    """Tiling [H, ...] B times along the folded axis puts head h at b·H + h: the axis is a head axis."""
    if len(src) != len(out) or not isinstance(repeats, (list, tuple)) or len(repeats) != len(src):
        return ()
    if any(r != 1 for i, r in enumerate(repeats) if i != axis):
        return ()
    return ("H",) if src[axis] == heads else ("X",) if src[axis] == 1 else ()


# ----------------------------------------------------------------------------------- slopes × positions
def _product(frame: _Frame, slopes: Any, positions: Any, upper: int | None) -> AlibiTerm | NotAlibi | None:
    s_val = tensor_val(slopes)
    if s_val is None or not s_val.dtype.is_floating_point or s_val.dim() > len(frame.roles):
        return None
    s_roles = frame.roles[len(frame.roles) - s_val.dim() :]
    if any(r not in BATCH_ROLES and not same_size(s_val.shape[a], 1) for a, r in enumerate(s_roles)):
        return None  # varies along queries or keys: not a per-head factor
    if "BH" in s_roles:
        return None
    coef = _key_coefficient(frame, positions, upper if frame.aligned else None)
    if not isinstance(coef, float):
        return coef
    if may_require_grad(slopes):
        return NotAlibi(
            "the ALiBi slopes are or derive from a graph input or parameter (under torch.compile parameters and "
            "buffers are inputs, and the graph does not say which require grad); the fused op takes no gradient "
            "for slopes, so they must be constants; kept as an additive bias"
        )
    return AlibiTerm(slopes, s_roles, frame.coef * coef, frame.head_pad)


def _key_coefficient(frame: _Frame, positions: Any, upper: int | None) -> float | NotAlibi | None:
    """c when `positions` is c · k plus a function of q (a per-row constant) on every score kept (k - q <= upper);
    else why not, or None."""
    shape, affine = shape_of(positions), index_expr(positions)
    if shape is None or len(shape) > len(frame.roles):
        return None
    roles = frame.roles[len(frame.roles) - len(shape) :]
    if affine is None or affine.rank != len(shape):
        value = constant_value(positions)
        coef = _value_key_coefficient(value, roles, upper) if value is not None and "K" in roles else None
        if coef is None:
            return _unprovable(positions, upper)
        affine = Affine(((roles.index("K"), coef),), 0.0, len(shape))
    coefs = {roles[axis]: c for axis, c in affine.coef}
    if set(coefs) - {"Q", "K"} or not coefs.get("K"):
        return None
    product_shape = shape_of(frame.node) or ()
    if not same_size(shape[roles.index("K")], product_shape[frame.roles.index("K")]):
        return None  # positions broadcast along the keys
    return coefs["K"]


def _value_key_coefficient(value: torch.Tensor, roles: Roles, upper: int | None) -> float | None:
    """c when a constant positions tensor is c · k plus a function of q on every kept score (k - q <= upper, or
    everywhere), constant along every other axis; None otherwise."""
    value = value.double()
    for axis, role in enumerate(roles):
        if role not in ("Q", "K") and not bool((value == value.narrow(axis, 0, 1)).all()):
            return None
    other = [axis for axis, role in enumerate(roles) if role not in ("Q", "K")]
    for axis in other:
        value = value.narrow(axis, 0, 1)
    grid = value.squeeze(other) if other else value
    grid = grid if "Q" in roles else grid.unsqueeze(0)  # [nq or 1, nk]
    if grid.shape[-1] < 2:
        return None
    steps = grid[:, 1:] - grid[:, :-1]  # along k, between keys k and k + 1
    if upper is not None and grid.shape[0] > 1:  # both keys kept: k + 1 - q <= upper
        k_next, q = torch.arange(1, grid.shape[-1]), torch.arange(grid.shape[0])[:, None]
        steps = steps[(k_next - q) <= upper]
    if steps.numel() == 0 or not bool((steps == steps.flatten()[0]).all()):
        return None
    coef = float(steps.flatten()[0])
    return coef if coef != 0.0 and math.isfinite(coef) else None


def _unprovable(positions: Any, upper: int | None) -> NotAlibi | None:
    node = positions
    while is_op(node, *CASTS, aten.unsqueeze, aten.neg, *SHAPE_VIEWS):
        node = node.args[0]
    inner = index_expr(node.args[0]) if is_op(node, aten.abs) else None
    if inner is not None and any(c for _, c in inner.coef):
        why = "this site has no causal mask" if upper is None else f"this site's masks keep k - q <= {upper}"
        return NotAlibi(
            f"the bias is -slope·|q - k| (symmetric): it equals slope·(k - q) up to a per-row constant only where "
            f"k - q has one sign, and {why}; kept as an additive mask"
        )
    if _reads(positions, aten.cumsum, depth=6):
        return NotAlibi(
            "ALiBi positions are computed from data (attention_mask.cumsum): they equal the key index up to a "
            "per-row shift only when every row's unmasked keys are contiguous, which the graph cannot show; "
            "kept as an additive bias"
        )
    return None


def _reads(node: Any, packet: Any, depth: int) -> bool:
    if not isinstance(node, fx.Node) or depth < 0:
        return False
    return is_op(node, packet) or any(_reads(n, packet, depth - 1) for n in node.all_input_nodes)


# ------------------------------------------------------------------------------------------ the op's slopes
def slopes_for_op(graph: fx.Graph, term: AlibiTerm, heads: int) -> fx.Node:
    """The [H] or [B, H] slopes tensor the attention op reads, built at the graph's insertion point."""
    node, roles = term.slopes, term.roles
    drop = [a for a, r in enumerate(roles) if r not in BATCH_ROLES]
    if drop:
        node = insert_call(graph, aten.squeeze.dims, (node, drop))
    kept = tuple(r for r in roles if r in BATCH_ROLES)
    if kept == ("B",):
        node, kept = insert_call(graph, aten.unsqueeze.default, (node, -1)), BATCH_ROLES
    shape = shape_of(node) or ()
    if kept == BATCH_ROLES and same_size(shape[0], 1):
        node, kept, shape = insert_call(graph, aten.squeeze.dim, (node, 0)), ("H",), shape[1:]
    covered = heads - sum(term.head_pad)  # heads beyond these have a zero bias: slope 0
    if not kept or not same_size(shape[-1], covered):
        node = insert_call(graph, aten.expand.default, (node, [-1, covered] if len(kept) == 2 else [covered]))
    if term.head_pad != (0, 0):
        node = insert_call(graph, aten.constant_pad_nd.default, (node, list(term.head_pad), 0.0))
    if term.coef != 1.0:
        node = insert_call(graph, aten.mul.Tensor, (node, term.coef))
    return node
