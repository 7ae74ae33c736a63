"""Match the semantic core of attention: softmax of a Q·Kᵀ contraction feeding a contraction with V.

The matcher anchors on the softmax, walks outward through ops that do not change meaning (casts, copies, GQA
repeats, transposes, dropout) and records what it passes on the way (scale, softcap, masks). Anything
it cannot account for ends the match with a Decline carrying the reason. Training-mode dropout on the
probabilities is recorded as dropout_p: the fused op draws its own keep mask (it cannot reproduce eager's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .attention_sinks import match_sinks
from .base import Decline
from .canonicalize_softmax import without_row_shift
from .graph import arg, aten, insert_call, is_op, ndim, scalar_value, single_user, static_shape, tensor_val
from .head_fold import merged_heads, split_heads, unfolded_source
from .masks import is_full_slice, is_very_negative
from .match_common import same_value
from .scalars import ScalarArg, ScalarProduct, fixed_scalar, scalar_arg, tensor_scalar_decline

CASTS = (aten.to, aten._to_copy, aten.type_as, aten.clone, aten.contiguous, aten.alias, aten.lift_fresh_copy)
SOFTMAX = (aten.softmax, aten._softmax, aten._safe_softmax)
VIEWS = (aten.view, aten.reshape, aten._unsafe_view)
CONTRACTIONS = (aten.matmul, aten.bmm, aten.baddbmm, aten.einsum)


@dataclass
class AttentionMatch:
    """Everything the rewrite needs about one site, before mask analysis."""

    anchor: fx.Node
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: ScalarProduct | None = None  # None: SDPA's default 1/sqrt(head_dim)
    softcap: ScalarArg | None = None  # > 0 when constant; a run-time softcap is passed through abs()
    additive: list[fx.Node] = field(default_factory=list)
    keeps: list[tuple[fx.Node, bool]] = field(default_factory=list)  # (cond, negated): keep = cond ^ negated
    causal: bool = False
    gqa_group: int = 1
    dropout_p: float = 0.0
    three_d: bool = False
    source: str = "matmul"
    enable_gqa: bool = False
    rope_cos: fx.Node | None = None
    rope_sin: fx.Node | None = None
    # H when Q·Kᵀ and P·V run on [B*H, N, D] around a [B, H, Nq, Nk] softmax (BLOOM); biases added to the
    # [B*H, Nq, Nk] scores before they are viewed per head are `folded_additive`.
    heads_folded: int | None = None
    folded_additive: list[fx.Node] = field(default_factory=list)
    sinks: fx.Node | None = None  # the [B, H, Nq, 1] sink logit column (attention_sinks.py)
    bias_betas: dict[fx.Node, float] = field(default_factory=dict)  # baddbmm bias inputs scaled by beta ≠ 1


def skip_casts(node: Any) -> Any:
    while is_op(node, *CASTS):
        node = node.args[0]
    return node


def _dropout_p(node: fx.Node) -> float:
    """The dropout probability in effect: p in training mode, 0 in eval mode (where dropout is the identity).

    p is read only in training mode: converting a run-time p to a float specializes it."""
    if not arg(node, 2, "train", False):
        return 0.0
    return fixed_scalar(arg(node, 1, "p", 0.0), "dropout p")


# ---------------------------------------------------------------------------------------- probabilities → V
def match_softmax_site(softmax: fx.Node) -> AttentionMatch:
    """Match around one softmax node; raises Decline with a reason."""
    dim = softmax.args[1]
    rank = ndim(softmax)
    if rank not in (3, 4) or dim not in (-1, rank - 1):
        raise Decline(f"softmax over dim {dim} of a rank-{rank} tensor is not attention over keys")
    sinks = match_sinks(softmax)
    pv, dropout_p, pv_heads = _find_pv(sinks.probs if sinks is not None else softmax)
    match = AttentionMatch(anchor=softmax, output=pv, q=pv, k=pv, v=pv, dropout_p=dropout_p)
    match.sinks = sinks.column if sinks is not None else None
    # softmax(s - rowmax(s)) is softmax(s): the kernel's online softmax does that shift itself.
    _peel_scores(without_row_shift(sinks.scores if sinks is not None else softmax.args[0], rank - 1), match)
    if pv_heads != match.heads_folded:
        raise Decline("heads are folded into the batch axis on one side of the softmax only")
    return match


def _find_pv(softmax: fx.Node) -> tuple[fx.Node, float, int | None]:
    """(P·V contraction, dropout p, H when the probabilities are viewed as [B*H, Nq, Nk] before it)."""
    node, dropout_p, heads = softmax, 0.0, None
    while True:
        user = single_user(node)
        if user is None:
            raise Decline(f"attention probabilities ({node.name}) are used outside the attention")
        if is_op(user, *CASTS):
            node = user
        elif is_op(user, aten.dropout):
            dropout_p = _dropout_p(user)
            node = user
        elif heads is None and merged_heads(user) is not None:
            heads, node = merged_heads(user), user
        elif is_op(user, aten.matmul, aten.bmm) and user.args[0] is node:
            return user, dropout_p, heads
        elif is_op(user, aten.einsum):  # one contracting the key axis was read as a matmul already
            raise Decline(f"the probabilities feed einsum '{user.args[0]}', which does not contract their key axis")
        else:
            raise Decline(f"softmax output feeds {user.target}, not a contraction with V")


# --------------------------------------------------------------------------------------- scores ← Q·Kᵀ
def _peel_scores(node: Any, match: AttentionMatch) -> None:
    """Walk from the softmax input back to the Q·Kᵀ contraction, recording ops from outside in."""
    outer_to_inner: list[tuple[str, Any]] = []
    while True:
        if is_op(node, aten.matmul, aten.bmm):
            break
        if is_op(node, aten.baddbmm):
            node = _peel_baddbmm(node, outer_to_inner, match)
            break
        if is_op(node, aten.einsum):
            raise Decline(f"the scores come from einsum '{node.args[0]}', which is not one contraction of Q and K")
        step = _peel_one(node, outer_to_inner)
        if step is None:
            target = getattr(node, "target", node)
            raise Decline(f"unsupported op {target} between Q·Kᵀ and softmax")
        node = step
    _apply_score_ops(list(reversed(outer_to_inner)), match)
    _check_masks_independent(match, node)
    _match_qk(node, match)


def _check_masks_independent(match: AttentionMatch, contraction: fx.Node, budget: int = 256) -> None:
    """A mask or bias computed from the scores themselves (top-k sparse attention, talking heads mixing the
    heads' scores) makes the weights no softmax of Q·Kᵀ plus an independent term."""
    for mask in [cond for cond, _ in match.keeps] + match.additive + match.folded_additive:
        if not isinstance(mask, fx.Node):
            continue
        stack, seen = [mask], {mask}
        while stack and len(seen) < budget:
            node = stack.pop()
            if node is contraction:
                why = "(e.g. top-k selection, talking heads): not a softmax of Q·Kᵀ plus an independent term"
                raise Decline(f"the mask or bias {mask.name} is computed from the scores themselves {why}")
            fresh = [n for n in node.all_input_nodes if n not in seen]
            seen.update(fresh)
            stack.extend(fresh)


def _peel_baddbmm(node: fx.Node, ops: list[tuple[str, Any]], match: AttentionMatch) -> fx.Node:
    """baddbmm(input, q, kᵀ, beta, alpha) = beta·input + alpha·(q @ kᵀ): a scale, then a bias unless beta is 0,
    where torch ignores the input (NaN and inf in it included; diffusers passes torch.empty there)."""
    kwargs: dict[str, Any] = dict(node.kwargs)
    beta, alpha = scalar_value(kwargs.get("beta", 1)), scalar_arg(kwargs.get("alpha", 1))
    if beta is None:
        raise Decline(f"baddbmm beta {kwargs.get('beta')} is not a constant (0 would ignore the input)")
    if alpha is None:
        raise Decline(f"baddbmm alpha {kwargs.get('alpha')} is not a scalar")
    if beta != 0.0:
        bias = node.args[0]
        if not isinstance(bias, fx.Node):
            raise Decline("baddbmm's input is not a tensor of the graph")
        ops.append(("add", bias))
        if beta != 1.0:
            match.bias_betas[bias] = beta
    if alpha != 1.0:
        ops.append(("scale", (alpha, 1)))
    return node


def _peel_one(node: Any, ops: list[tuple[str, Any]]) -> Any:
    if is_op(node, *CASTS):
        return node.args[0]
    if is_op(node, aten.mul, aten.div):
        return _peel_mul(node, ops)
    if is_op(node, aten.add):
        return _peel_add(node, ops)
    if is_op(node, aten.masked_fill):
        if not is_very_negative(node.args[2]):
            raise Decline(f"masked_fill with value {node.args[2]} is not a mask")
        ops.append(("keep", (node.args[1], True)))
        return node.args[0]
    if is_op(node, aten.where):
        return _peel_where(node, ops)
    heads = split_heads(node)
    if heads is not None:
        if any(kind == "fold" for kind, _ in ops):
            raise Decline("attention scores are viewed per head twice")
        ops.append(("fold", heads))
        return node.args[0]
    return None


def _peel_mul(node: fx.Node, ops: list[tuple[str, Any]]) -> Any:
    a, b = node.args[0], node.args[1]
    softcap = _softcap_input(node)
    if softcap is not None:
        inner, cap = softcap
        ops.append(("softcap", cap))
        return inner
    for x, c in ((a, b), (b, a)) if is_op(node, aten.mul) else ((a, b),):
        value = scalar_arg(c)
        if value is not None:
            ops.append(("scale", (value, -1 if is_op(node, aten.div) else 1)))
            return x
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and tensor_val(a) is not None and tensor_val(b) is not None:
        factor = b if _leads_to_scores(a) else a
        if ndim(factor) == 0:
            raise tensor_scalar_decline("attention scale", factor)
        raise Decline(f"attention scores are multiplied by the tensor {factor.name}")
    return None


def _softcap_input(node: fx.Node) -> tuple[Any, ScalarArg] | None:
    """mul(tanh(x / c), c) -> (x, c); c may be a run-time scalar (the same node on both sides)."""
    if not is_op(node, aten.mul):
        return None
    tanh: Any = node.args[0]
    cap = scalar_arg(node.args[1])
    if not is_op(tanh, aten.tanh) or cap is None:
        return None
    inner: Any = tanh.args[0]
    if is_op(inner, aten.div) and _same_scalar(scalar_arg(inner.args[1]), cap):
        return inner.args[0], cap
    divisor = scalar_value(inner.args[1]) if is_op(inner, aten.mul) else None
    if divisor is not None and isinstance(cap, float) and abs(divisor * cap - 1.0) < 1e-6:
        return inner.args[0], cap
    return None


def _same_scalar(a: ScalarArg | None, b: ScalarArg) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b or (isinstance(a, fx.Node) and isinstance(b, fx.Node) and same_value(a, b))
    return a == b


def _peel_add(node: fx.Node, ops: list[tuple[str, Any]]) -> Any:
    if node.kwargs.get("alpha", 1) != 1:
        raise Decline("scores + alpha·mask with alpha != 1")
    a, b = node.args[0], node.args[1]
    if _leads_to_scores(a):
        ops.append(("add", b))
        return a
    if _leads_to_scores(b):
        ops.append(("add", a))
        return b
    return None


def _peel_where(node: fx.Node, ops: list[tuple[str, Any]]) -> Any:
    cond, a, b = node.args
    if _leads_to_scores(a) and is_very_negative(b):
        ops.append(("keep", (cond, False)))
        return a
    if _leads_to_scores(b) and is_very_negative(a):
        ops.append(("keep", (cond, True)))
        return b
    raise Decline("where() on the scores whose other branch is not a large negative fill")


def _leads_to_scores(node: Any) -> bool:
    """Cheap look-ahead: does `node` reach a Q·Kᵀ contraction through score-chain ops?"""
    return score_contraction(node) is not None


def score_contraction(node: Any, depth: int = 12) -> fx.Node | None:
    """The contraction (matmul, bmm, baddbmm or einsum) that `node` reaches through score-chain ops, or None."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return None
        if is_op(node, *CONTRACTIONS):
            return node
        if is_op(node, *CASTS, *VIEWS, aten.mul, aten.div, aten.masked_fill, aten.tanh):
            node = node.args[0]
        elif is_op(node, aten.add, aten.where):
            operands = node.args[1:] if is_op(node, aten.where) else node.args
            found = (score_contraction(x, depth - 1) for x in operands)
            return next((c for c in found if c is not None), None)
        else:
            return None
    return None


def _apply_score_ops(inner_to_outer: list[tuple[str, Any]], match: AttentionMatch) -> None:
    """Accept scale → softcap → masks in that order (scales multiply); other orders change the math.

    Ops inside a head fold (before the scores are viewed per head) act on [B*H, Nq, Nk] scores.
    """
    scale, seen_softcap, seen_mask = ScalarProduct(), False, False
    folded = any(kind == "fold" for kind, _ in inner_to_outer)
    for kind, value in inner_to_outer:
        if kind == "fold":
            match.heads_folded, folded = value, False
        elif kind == "scale":
            if seen_softcap or seen_mask:
                raise Decline("scores are scaled after softcap or masking")
            scale = scale.times(*value)
        elif kind == "softcap":
            if seen_mask or seen_softcap:
                raise Decline("softcap applied after masking")
            match.softcap, seen_softcap = _softcap_value(value), True
        elif kind == "add":
            (match.folded_additive if folded else match.additive).append(value)
            seen_mask = True
        elif folded:
            raise Decline("a keep-mask is applied to head-folded [B*H, Nq, Nk] scores")
        else:
            match.keeps.append(value)
            seen_mask = True
    match.scale = scale


def _softcap_value(cap: ScalarArg) -> ScalarArg:
    """c·tanh(x/c) is even in c, so a negative cap is its absolute value; a cap of 0 gives 0·tanh(±inf) scores
    (NaN where a score is 0) and declines."""
    if isinstance(cap, fx.Node):
        return cap
    if cap == 0.0:
        raise Decline("softcap of 0 (tanh(scores / 0) * 0 is 0 or NaN): not a softcap")
    return abs(cap)


def scale_biases(graph: fx.Graph, match: AttentionMatch) -> None:
    """Insert beta·input for each baddbmm bias whose beta is not 1 (at the current point, once the site fuses)."""
    for biases in (match.additive, match.folded_additive):
        for i, bias in enumerate(biases):
            if bias in match.bias_betas:
                biases[i] = insert_call(graph, aten.mul.Tensor, (bias, match.bias_betas[bias]))


# -------------------------------------------------------------------------------------------- Q, K and V
def _match_qk(contraction: fx.Node, match: AttentionMatch) -> None:
    a, b = contraction.args[1:3] if is_op(contraction, aten.baddbmm) else contraction.args[:2]
    q, q_scale = _strip_scale(a)
    kt, kt_scale = _strip_scale(b)
    k_scaled = _untranspose(kt)
    if k_scaled is None:
        raise Decline("second operand of Q·Kᵀ is not a transposed key tensor")
    k, k_scale = _strip_scale(k_scaled)  # a scale may sit on either side of the transpose
    # A scale of 0 is a scale (uniform attention): never `or`-defaulted.
    outer = match.scale if match.scale is not None else ScalarProduct()
    match.scale = outer.mul(q_scale).mul(kt_scale).mul(k_scale)
    v = match.output.args[1]
    match.q, match.k, match.v = skip_casts(q), k, skip_casts(v)
    rank = _unfold_qkv(match) if match.heads_folded is not None else ndim(contraction)
    match.three_d = rank == 3 and match.heads_folded is None
    if rank == 4:
        match.k, k_group = walk_kv(match.k)
        match.v, v_group = walk_kv(match.v)
        if k_group != v_group:
            raise Decline(f"K and V are repeated differently (groups {k_group} and {v_group})")
        match.gqa_group = k_group


def _unfold_qkv(match: AttentionMatch) -> int:
    """Q, K and V as the [B, H, N, D] tensors their [B*H, N, D] operands reshape, when all three are visible
    (rank 4); otherwise they stay 3-D and the rewrite unfolds them (rank 3)."""
    heads = match.heads_folded or 1
    sources = [unfolded_source(n, heads) if isinstance(n, fx.Node) else None for n in (match.q, match.k, match.v)]
    if any(s is None for s in sources):
        return 3
    match.q, match.k, match.v = (skip_casts(s) for s in sources)
    return 4


def _strip_scale(node: Any) -> tuple[Any, ScalarProduct]:
    """(x, s) for Q or K written as x · s or x / s, s constant or a run-time scalar."""
    scale = ScalarProduct()
    while True:
        node = skip_casts(node)
        factor = scalar_arg(node.args[1]) if is_op(node, aten.mul, aten.div) else None
        if factor is None:
            return node, scale
        scale = scale.times(factor, -1 if is_op(node, aten.div) else 1)
        node = node.args[0]


def _untranspose(node: Any) -> fx.Node | None:
    """K from Kᵀ: transpose of the last two dims, permute swapping them, or mT."""
    node = skip_casts(node)
    rank = ndim(node)
    if is_op(node, aten.mT):
        return skip_casts(node.args[0])
    if is_op(node, aten.transpose):
        dims = {d % rank for d in node.args[1:3]}
        return skip_casts(node.args[0]) if dims == {rank - 1, rank - 2} else None
    if is_op(node, aten.permute):
        perm = [d % rank for d in node.args[1]]
        expected = [*range(rank - 2), rank - 1, rank - 2]
        return skip_casts(node.args[0]) if perm == expected else None
    return None


def walk_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """(base, group): see through repeat_kv (unsqueeze→expand→reshape, or flatten(1, 2) as torchtune writes it),
    repeat_interleave and MQA expand."""
    node = skip_casts(node)
    merges = is_op(node, *VIEWS) or (is_op(node, aten.flatten) and tuple(node.args[1:3]) == (1, 2))
    repeated = _repeat_kv_base(node) if merges else None
    if repeated is not None:
        return repeated
    repeats = arg(node, 1, "repeats") if is_op(node, aten.repeat_interleave) else None
    if isinstance(repeats, int) and arg(node, 2, "dim") in (1, -3):
        return skip_casts(node.args[0]), repeats
    if is_op(node, aten.expand) and ndim(node) == 4:
        base = skip_casts(node.args[0])
        base_heads, heads = static_shape(base)[1], static_shape(node)[1]
        if base_heads == 1 and heads is not None and ndim(base) == 4:
            return base, heads
    return node, 1


def _repeat_kv_base(view: fx.Node) -> tuple[fx.Node, int] | None:
    """HF repeat_kv: x[:, :, None].expand(b, h, g, s, d).reshape(b, h * g, s, d) -> (x, g)."""
    source = skip_casts(view.args[0])
    if not is_op(source, aten.expand) or ndim(source) != 5:
        return None
    inner = skip_casts(source.args[0])
    while is_op(inner, aten.slice) and is_full_slice(inner):
        inner = inner.args[0]
    if not is_op(inner, aten.unsqueeze) or inner.args[1] not in (2, -3):
        return None
    base = skip_casts(inner.args[0])
    b, heads, seq, dim = static_shape(base)
    group = static_shape(source)[2]
    if group is None or heads is None or static_shape(view) != (b, heads * group, seq, dim):
        return None
    return base, group
