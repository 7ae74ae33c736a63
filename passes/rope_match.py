"""Recognize rotary embeddings by meaning and describe each site as a RopeMatch.

A RoPE site is a value y whose every feature j is `x[..., σ(j)]·c_j ± x[..., partner]·s_j`: a linear map of one
tensor x that pairs features (i, p(i)) by halves (rotate-half, Llama/NeoX) or by neighbours (interleaved, GPT-J),
with coefficients read from tables that do not depend on x (rope_linear.py works the map out from the graph, through
whatever views, reshapes, stacks, unbinds, einops rearranges or complex products build it). The tail of a partial
rotary passes through; σ may also take x de-interleaved (DeepSeek-V3) or a slice of it. The pair must rotate:
both features scaled by the same table and the partner terms of opposite signs — unless one table holds the whole
2×2 matrix of each pair (HiDream, Kandinsky), whose values the graph cannot show. Matchers raise `Decline` with
the reason a candidate is not RoPE, and return None for nodes that are no candidate.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..specs import RopeLayout
from .base import Decline
from .graph import aten, dtype_of, is_op, region_between, single_user, static_dim, tensor_val
from .match_common import cast_source, node_order, op_name
from .rope_linear import ONE, RULES, Coef, Linear, LinearEvaluator, NotLinear, TableGrowsX
from .rope_tables import Table, resolve, table_of

_MAX_WALK = 8  # ops after the anchor that may still belong to the site (stack, flatten, cat of a tail...)
_MAX_CLOSURE = 256
_MAX_CANDIDATES = 64
_FORWARD = (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten, aten.flatten, aten.cat, aten.stack,
            aten.view_as_real, aten.alias)  # fmt: skip
_INCOMPLETE = "a feature is paired with a feature outside the rotated value"
_TRIG = (aten.cos, aten.sin, aten.polar, aten.exp)
# The ops the evaluator interprets, and those whose outputs it reads through a getitem (a set: asked of every node
# behind every anchor).
_LINEAR_OPS = frozenset(p for packets, _ in RULES for p in packets if p != "getitem") | {
    aten.unbind, aten.chunk, aten.split, aten.split_with_sizes
}  # fmt: skip
# The ops that let an element read a feature of x other than the one at its own position. Without one behind the
# anchor, element i of every value there reads feature i of x only (or copies of it, broadcast by a table to more
# elements than x has, which no op there narrows back to a rotation of x), so no element reads a pair.
_PAIRING = frozenset({aten.cat, aten.stack, aten.select, aten.slice, aten.permute, aten.transpose, aten.unbind,
                      aten.chunk, aten.split, aten.split_with_sizes, aten.sum, aten.view_as_complex})  # fmt: skip


@dataclass
class RopeMatch:
    """One RoPE site: the op's operands (tables still to build) and the node whose uses it takes over."""

    x: fx.Node
    cos: Table
    sin: Table
    layout: RopeLayout
    rotary_dim: int
    output: fx.Node
    source: str
    x_view: str = "whole"  # "whole", "slice" (x[..., start:start + width]) or "deinterleave"
    start: int = 0
    width: int = 0
    nodes: set[fx.Node] = field(default_factory=set)


class SiteDecline(Decline):
    """A declined candidate, with the nodes it covered so that other anchors inside it are not declined again."""

    def __init__(self, reason: str, covered: set[fx.Node]) -> None:
        super().__init__(reason)
        self.covered = covered


@dataclass(frozen=True)
class _PairMap:
    x_view: str
    start: int
    layout: RopeLayout
    rotary_dim: int
    cos: list[Coef]
    sin: list[Coef]
    matrix: bool


# ------------------------------------------------------------------------------------------------ anchors
def rope_anchor(node: fx.Node) -> bool:
    """A candidate: a sum or difference of two values, a sum over an axis, or a product of a complex view."""
    if is_op(node, aten.add, aten.sub):
        return len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])
    if is_op(node, aten.mul):
        return any(is_op(a, aten.view_as_complex) for a in node.args)
    return is_op(node, aten.sum) and len(node.args) > 1


def match_rope(anchor: fx.Node) -> RopeMatch | None:
    """The RoPE site anchored at `anchor`; None when it is no rotation of features; Decline when it is one that
    cannot be fused (with the reason). Each tensor behind the anchor is tried as x; of the sites found, one whose
    output has x's shape wins (the rope op then feeds what read it, so attention can absorb it), then the one
    rotating the most features (not a view of x's pairs), then the fewest table factors (a norm's weight stays the
    norm's, not folded into cos/sin), then the x furthest upstream (views of x belong to the site).
    With no site, the first reason a rotation of some x was declined."""
    grows: TableGrowsX | None = None
    declined: Decline | None = None
    found: list[RopeMatch] = []
    order = node_order(anchor.graph)
    for x in _x_candidates(anchor, order):
        try:
            ev = LinearEvaluator(x, order)
            lin = ev.value(anchor)
        except TableGrowsX as err:
            grows = grows or err
            continue
        except NotLinear:
            continue
        if not _mixes_with_tables(lin):
            continue
        try:
            found.append(_complete_site(ev, anchor))
        except Decline as decline:
            declined = declined or decline
    if found:
        return max(found, key=lambda m: (_shape_of(m.output) == _shape_of(m.x), m.width, -_factors(m), -order[m.x]))
    if declined is not None:
        raise declined
    if grows is not None and _looks_rotated(anchor):
        raise Decline(str(grows))
    return None


def _factors(m: RopeMatch) -> int:
    return len(m.cos.sources) + len(m.sin.sources)


def _mixes_with_tables(lin: Linear) -> bool:
    """Some element reads two features of x, each scaled by a table: what every rotation does (a sum of two
    features with constant coefficients is some other linear map)."""
    return any(e is not None and len(e) == 2 and all(c.factors for _, c in e) for e in lin.elems)


def _looks_rotated(anchor: fx.Node) -> bool:
    """A negated operand joined with another on a trailing axis behind the anchor (a rotation that could not be
    read because a table grows x), so that its decline is reported rather than silently skipped."""
    stack, seen, joined, negated = [anchor], {anchor}, False, False
    while stack and len(seen) < _MAX_CLOSURE:
        node = stack.pop()
        joined |= is_op(node, aten.cat, aten.stack, aten.view_as_complex)
        negated |= is_op(node, aten.neg, aten.sub, aten.view_as_complex)
        for parent in node.all_input_nodes:
            if parent not in seen and _interpretable(parent):
                seen.add(parent)
                stack.append(parent)
    return joined and negated


def _x_candidates(anchor: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """Tensors behind `anchor` through linear ops, the likeliest x first: not a cos/sin, the furthest upstream (so
    the site covers every op between x and its output). None when no op behind the anchor pairs features: no x
    is rotated there, and evaluating each tensor would be the cost of every residual add."""
    nodes: set[fx.Node] = set()
    stack, seen, pairs = [anchor], {anchor}, False
    while stack and len(seen) < _MAX_CLOSURE:
        node = stack.pop()
        pairs |= _packet(node) in _PAIRING
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                nodes.add(parent)
                if _interpretable(parent):
                    stack.append(parent)
    if not pairs and not stack:  # the whole closure was seen
        return []
    candidates = [n for n in nodes if _is_real_tensor(n)]
    ranked = sorted(candidates, key=lambda n: (any(is_op(n, t) for t in _TRIG), order[n]))
    return ranked[:_MAX_CANDIDATES]


def _interpretable(node: fx.Node) -> bool:
    return node.target is operator.getitem or _packet(node) in _LINEAR_OPS


def _packet(node: fx.Node) -> Any:
    """The op `node` calls, all overloads as one (aten.add for aten.add.Tensor); None for a node calling none."""
    return getattr(node.target, "overloadpacket", node.target) if node.op == "call_function" else None


def _is_real_tensor(node: fx.Node) -> bool:
    t = tensor_val(node)
    return t is not None and t.dim() >= 1 and t.is_floating_point()


# -------------------------------------------------------------------------------------------- the site
def _complete_site(ev: LinearEvaluator, anchor: fx.Node) -> RopeMatch:
    """Walk from the anchor through the ops that assemble the rotated value (stack, flatten, cat of the tail...)
    and keep the last node that is a whole rotation of x, preferring one of x's shape."""
    found: list[tuple[fx.Node, _PairMap]] = []
    reason, node, user = "", anchor, None
    for _ in range(_MAX_WALK):
        try:
            lin = ev.value(node)
            found.append((node, _pair_map(lin, _last_size(ev.x))))
        except Decline as decline:
            reason = decline.reason
        except NotLinear:
            break
        user = single_user(node)
        if user is None or not (is_op(user, *_FORWARD) or _same_dtype_cast(user, node)):
            break
        node = user
    if not found:
        covered = region_between(anchor.graph, [ev.x], node) | _linear_users(ev.x)  # its other half, if any
        if reason == _INCOMPLETE:
            readers = ", ".join(sorted({op_name(u) for u in node.users})) or "nothing"
            reason = (
                f"this value holds part of each rotated pair; it is then read by {readers}, not a view, cat or stack"
            )
        raise SiteDecline(reason or "not a rotation of x's features", covered)
    same_shape = [(n, m) for n, m in found if _shape_of(n) == _shape_of(ev.x)]
    output, pair_map = (same_shape or found)[-1]
    return _site(ev, output, pair_map)


def _linear_users(x: fx.Node) -> set[fx.Node]:
    """Nodes reached from x through linear ops (bounded): the anchors of one rotation written in parts."""
    seen: set[fx.Node] = set()
    stack = [x]
    while stack and len(seen) < _MAX_CLOSURE:
        for user in stack.pop().users:
            if user not in seen and _interpretable(user):
                seen.add(user)
                stack.append(user)
    return seen


def _same_dtype_cast(user: fx.Node, node: fx.Node) -> bool:
    """`type_as` / `to` that changes nothing (torchtune's `x_out.type_as(x)` in fp32)."""
    return cast_source(user) is node and dtype_of(user) == dtype_of(node)


def _site(ev: LinearEvaluator, output: fx.Node, m: _PairMap) -> RopeMatch:
    cos, sin = table_of(m.cos), table_of(m.sin)
    if cos is None or sin is None:
        raise Decline("the rotated features read their coefficients from different tables")
    if not cos.sources or not sin.sources:
        raise Decline("a coefficient of the rotation is a constant, not a table")
    nodes = _check_region(ev.x, output)
    source = _source(nodes, m, cos)
    width = len(ev.value(output).elems)
    match = RopeMatch(ev.x, cos, sin, m.layout, m.rotary_dim, output, source, m.x_view, m.start, width, nodes)
    return match


def _source(nodes: set[fx.Node], m: _PairMap, cos: Table) -> str:
    """How the model spelled it: complex, matrix (a 2×2 table per pair), split_pairs (even/odd features in, halves
    out), split_halves (per-pair tables on the halves), else the layout."""
    if any(is_op(n, aten.view_as_complex) for n in nodes):
        return "complex"
    if m.matrix:
        return "matrix"
    if m.x_view == "deinterleave":
        return "split_pairs"
    half = m.rotary_dim // 2
    if m.layout == "rotate_half" and cos.indices[:half] == cos.indices[half:]:
        return "split_halves"
    return m.layout


def _last_size(node: fx.Node) -> int:
    return int(tensor_val(node).shape[-1])  # type: ignore[union-attr]


def _shape_of(node: fx.Node) -> tuple[Any, ...]:
    return tuple(static_dim(d) for d in tensor_val(node).shape)  # type: ignore[union-attr]


def _check_region(x: fx.Node, output: fx.Node) -> set[fx.Node]:
    """Everything between x and the output belongs to the rotation; none of it may be read elsewhere (a read of
    its dtype only, `type_as(y, x.float())`, does not count)."""
    region = region_between(output.graph, [x], output)
    order = node_order(output.graph)
    escaping = [n for n in region if n is not output and any(_reads_value(u, n) for u in n.users if u not in region)]
    if escaping:
        raise Decline(f"intermediate {op_name(min(escaping, key=order.__getitem__))} is used outside the rope")
    return region


def _reads_value(user: fx.Node, node: fx.Node) -> bool:
    return not (is_op(user, aten.type_as) and user.args[0] is not node)


# ----------------------------------------------------------------------------------------- the pair map
def _pair_map(lin: Linear, size: int) -> _PairMap:
    """Check that `lin` rotates pairs of x's features; raises Decline with the reason it does not."""
    if lin.complex or any(e is None for e in lin.elems):
        raise Decline("the rotated value is not assembled yet")
    elems: list[tuple[tuple[int, Coef], ...]] = list(lin.elems)  # type: ignore[arg-type]
    x_view, start, sigma = _own_features(elems, size)
    position = {f: j for j, f in enumerate(sigma)}
    partners: list[int] = []
    for j, elem in enumerate(elems):
        others = [k for k, _ in elem if k != sigma[j]]
        if others and others[0] not in position:
            raise Decline(_INCOMPLETE)
        partners.append(position[others[0]] if others else -1)
    r = sum(p >= 0 for p in partners)
    if r == 0 or r % 2 or any(p < 0 for p in partners[:r]):
        raise Decline("the rotated features are not the leading ones of x")
    _check_tail(elems[r:], sigma[r:])
    if x_view == "deinterleave" and r != len(elems):
        raise Decline("a partial rotary of de-interleaved features")
    layout = _layout(partners[:r])
    first = [j for j in range(r) if (j < r // 2 if layout == "rotate_half" else j % 2 == 0)]
    coef = [{k: c for k, c in elem} for elem in elems[:r]]
    self_c = [coef[j][sigma[j]] for j in range(r)]
    partner_c = [coef[j][sigma[partners[j]]] for j in range(r)]
    matrix = all(_is_matrix(self_c, partner_c, j, partners[j]) for j in first)
    if not matrix:
        for j in first:
            _check_rotation(self_c, partner_c, j, partners[j], sigma)
    sin = [partner_c[j].times(-1.0 if j in set(first) else 1.0) for j in range(r)]
    return _PairMap(x_view, start, layout, r, self_c, sin, matrix)


def _own_features(elems: list[tuple[tuple[int, Coef], ...]], size: int) -> tuple[str, int, list[int]]:
    """How output feature j reads its own feature σ(j) of x: x whole, a slice of it, or x de-interleaved."""
    n = len(elems)
    hypotheses: list[tuple[str, int, list[int]]] = []
    if n == size:
        hypotheses.append(("whole", 0, list(range(n))))
        if n % 2 == 0:
            hypotheses.append(("deinterleave", 0, [2 * j if j < n // 2 else 2 * (j - n // 2) + 1 for j in range(n)]))
    else:
        hypotheses += [("slice", k, [k + j for j in range(n)]) for k, _ in elems[0] if k + n <= size]
    for view, start, sigma in hypotheses:
        if all(any(k == sigma[j] for k, _ in e) for j, e in enumerate(elems)):
            return view, start, sigma
    if n < size and any(len(e) == 2 for e in elems):
        raise Decline(_INCOMPLETE)  # e.g. the even outputs of an interleaved rotation, before they are stacked
    raise Decline("the output's features are not x's own features in order")


def _check_tail(elems: list[tuple[tuple[int, Coef], ...]], sigma: list[int]) -> None:
    for elem, own in zip(elems, sigma, strict=True):
        (_, c), *_ = elem
        if c != ONE:
            raise Decline(f"feature {own} is scaled but not rotated")


def _layout(partners: list[int]) -> RopeLayout:
    r = len(partners)
    if all(partners[j] == (j + r // 2) % r for j in range(r)):
        return "rotate_half"
    if all(partners[j] == j ^ 1 for j in range(r)):
        return "interleaved"
    raise Decline("features are paired neither by halves nor by neighbours")


def _is_matrix(self_c: list[Coef], partner_c: list[Coef], f: int, s: int) -> bool:
    """The pair's four coefficients are the four entries of one 2×2 block of a table ([..., d/2, 2, 2]): the pair's
    rotation matrix, whose signs are in its values (HiDream, Kandinsky)."""
    entries = [tuple(resolve(x) for x in c.factors) for c in (self_c[f], self_c[s], partner_c[f], partner_c[s])]
    if any(len(e) != 1 for e in entries):
        return False
    factors = [e[0] for e in entries]
    if len({(x.node, x.block, x.part) for x in factors}) != 1 or factors[0].block[-2:] != (2, 2):
        return False
    return len({x.index // 4 for x in factors}) == 1 and {x.index % 4 for x in factors} == {0, 1, 2, 3}


def _check_rotation(self_c: list[Coef], partner_c: list[Coef], f: int, s: int, sigma: list[int]) -> None:
    """Both features of a pair scale themselves by one table, and their partner terms have opposite signs."""
    pair = f"({sigma[f]}, {sigma[s]})"
    if _tables(self_c[f]) != _tables(self_c[s]) or self_c[f].scale != self_c[s].scale:
        raise Decline(f"not a rotation: features {pair} scale themselves by different tables")
    if _tables(partner_c[f]) != _tables(partner_c[s]):
        raise Decline(f"not a rotation: features {pair} scale their partners by different tables")
    if partner_c[f].scale != -partner_c[s].scale:
        raise Decline(f"not a rotation: the partner terms of features {pair} have the same sign")


def _tables(c: Coef) -> tuple[tuple[fx.Node, tuple[int, ...], int], ...]:
    return tuple(sorted(((f.node, f.block, f.part) for f in map(resolve, c.factors)), key=lambda t: t[0].name))
