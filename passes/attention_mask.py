"""Turn a matched site's masks and biases into the attention op's mask arguments.

Keep-masks and `where(pred, 0, -inf)` biases become causal/window flags where masks.py proves them, ALiBi biases
become per-head slopes where alibi.py proves them, and everything else is combined into one data mask tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .alibi import FOLDED_ROLES, SCORE_ROLES, AlibiTerm, NotAlibi, Roles, match_alibi, slopes_for_op
from .attention_match import AttentionMatch
from .base import Decline, FixableDecline
from .graph import arg, aten, insert_call, is_op, may_require_grad, static_dim, static_shape, tensor_val
from .head_fold import split_heads, unfold_heads
from .masks import (
    MaskFacts,
    added_fill_masks,
    analyze_keep,
    classify,
    constant_fill,
    distance_upper,
    is_bool,
    keep_from_additive,
)
from .positions import shape_of, structure_holds


@dataclass
class SiteMask:
    """The op's mask arguments: data mask node and kind, ALiBi slopes node, causal/window flags."""

    node: fx.Node | None
    kind: str
    causal: bool
    align: str
    window: int | None
    alibi: fx.Node | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Biases:
    additive: list[fx.Node] = field(default_factory=list)  # in score space
    folded: list[fx.Node] = field(default_factory=list)  # on [B*H, Nq, Nk] scores, unfolded before use
    alibi: AlibiTerm | None = None
    notes: list[str] = field(default_factory=list)


def mask_inputs(match: AttentionMatch) -> list[fx.Node]:
    """Every mask or bias node the site reads."""
    nodes = [cond for cond, _ in match.keeps] + match.additive + match.folded_additive
    return [n for n in nodes if isinstance(n, fx.Node)]


def check_biases(match: AttentionMatch) -> None:
    for node in match.additive + match.folded_additive:
        val = tensor_val(node) if isinstance(node, fx.Node) else None
        if val is None or is_bool(node):
            raise Decline(f"additive mask {getattr(node, 'name', node)} is not a float tensor")
        if not val.is_floating_point():  # scores + int mask: the op takes bool or floating masks only
            raise FixableDecline(
                f"additive mask {getattr(node, 'name', node)} has integer dtype {val.dtype}",
                "integer_attention_mask",
                "give the mask a floating dtype (an additive bias) or bool (True = attend)",
            )
    for node in match.additive:
        if may_require_grad(node) and not any(may_require_grad(term) for term in _split_bias(node)[1]):
            # The op differentiates its mask and slopes arguments; a learned bias that reaches neither would
            # silently lose its gradient.
            raise Decline(f"bias {node.name} may require grad, but the mask analysis passes none of it to the op")


def build_mask(graph: fx.Graph, match: AttentionMatch, q_len: Any, kv_len: Any) -> SiteMask:
    """Insert the nodes the op's mask arguments need (at the current insertion point); never declines."""
    facts = MaskFacts()
    for cond, negated in match.keeps:
        facts = facts.merge(analyze_keep(cond, negated))
    facts, biases = _sort_biases(match, facts, kv_len)
    positional, leftover = classify(facts.constraints, static_dim(q_len), static_dim(kv_len))
    keep_node = _conjoin(graph, facts.data + leftover)
    heads = match.heads_folded or 1
    add_node = _sum(graph, biases.additive + [unfold_heads(graph, n, heads) for n in biases.folded])
    if keep_node is not None and add_node is not None:
        add_node = insert_call(graph, aten.where.ScalarOther, (keep_node, add_node, float("-inf")))
        keep_node = None
    mask_node = keep_node if keep_node is not None else add_node
    if mask_node is not None and match.three_d and mask_node.meta["val"].dim() == 3:
        mask_node = insert_call(graph, aten.unsqueeze.default, (mask_node, 1))
    slopes = slopes_for_op(graph, biases.alibi, _op_heads(match)) if biases.alibi is not None else None
    align = positional.align if positional.causal else "top_left"
    detail = {"alibi_kept_additive": biases.notes} if biases.notes else {}
    causal = positional.causal or match.causal
    return SiteMask(mask_node, _mask_kind(mask_node), causal, align, positional.window, slopes, detail)


def _op_heads(match: AttentionMatch) -> int:
    if match.heads_folded is not None:
        return match.heads_folded
    heads = static_shape(match.q)[1] if not match.three_d else 1
    return heads or 1


def _sort_biases(match: AttentionMatch, facts: MaskFacts, kv_len: Any) -> tuple[MaskFacts, _Biases]:
    biases = _Biases()
    roles = ("B", "Q", "K") if match.three_d else SCORE_ROLES  # a 3-D site's batch axis is the op's batch
    terms: list[fx.Node] = []
    for bias in match.additive:
        keeps, bias_terms = _split_bias(bias)
        for keep in keeps:
            facts = facts.merge(analyze_keep(*keep))
        terms += bias_terms
    upper = distance_upper(facts.constraints)  # every keep is applied (flag or data): ALiBi need hold only there
    for node in terms:
        if not _take_alibi(biases, node, roles, None, kv_len, upper):
            biases.additive.append(node)
    for node in match.folded_additive:
        if not _take_alibi(biases, node, FOLDED_ROLES, match.heads_folded, kv_len, upper):
            biases.folded.append(node)
    return facts, biases


def _split_bias(node: fx.Node) -> tuple[list[tuple[fx.Node, bool]], list[fx.Node]]:
    """A bias as keep-masks and additive terms: `where(pred, 0, -inf)`, `masked_fill(x, m, -inf)` and
    `where(pred, x, -inf)` hold a keep-mask (Falcon adds ALiBi into its causal mask), and adds of two tensors
    split into their terms. Adding -inf (or a fill that absorbs the scores, masks.absorbs_scores) masks a score
    whatever else is added.
    Copies that keep values and dtype (T5 under SDPA makes its combined mask `.contiguous()`) are looked through."""
    if not structure_holds(node):  # written in place after it was made: read as it is
        return [], [node]
    if is_op(node, aten.contiguous, aten.clone, aten.alias) and isinstance(node.args[0], fx.Node):
        return _split_bias(node.args[0])
    keep = keep_from_additive(node)
    if keep is not None:
        return [keep], []
    if is_op(node, aten.zeros, aten.zeros_like) or constant_fill(node) == 0.0:
        return [], []
    masked = _masked_term(node)
    if masked is not None:
        keeps, terms = _split_bias(masked[1])
        return [masked[0], *keeps], terms
    a, b = (node.args[0], node.args[1]) if is_op(node, aten.add) and node.kwargs.get("alpha", 1) == 1 else (0, 0)
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and not is_bool(a) and not is_bool(b):
        (keeps_a, terms_a), (keeps_b, terms_b) = _split_bias(a), _split_bias(b)
        return keeps_a + keeps_b, terms_a + terms_b
    return [], [node]


def _masked_term(node: fx.Node) -> tuple[tuple[fx.Node, bool], fx.Node] | None:
    """((pred, negated), x) for masked_fill(x, pred, -inf), where(pred, x, -inf) or where(pred, -inf, x), -inf or
    another fill that absorbs the scores."""
    args: tuple[Any, ...] = node.args
    if is_op(node, aten.masked_fill) and added_fill_masks(args[2], node) and isinstance(args[1], fx.Node):
        return ((args[1], True), args[0]) if isinstance(args[0], fx.Node) else None
    if not is_op(node, aten.where) or len(args) != 3 or not isinstance(args[0], fx.Node):
        return None
    if added_fill_masks(args[2], node) and isinstance(args[1], fx.Node) and not is_bool(args[1]):
        return (args[0], False), args[1]
    if added_fill_masks(args[1], node) and isinstance(args[2], fx.Node) and not is_bool(args[2]):
        return (args[0], True), args[2]
    return None


def _take_alibi(
    biases: _Biases, node: fx.Node, roles: Roles, heads: int | None, kv_len: Any, upper: int | None
) -> bool:
    term = match_alibi(node, roles, heads, kv_len, upper)
    if isinstance(term, AlibiTerm) and biases.alibi is None:
        biases.alibi = term
        return True
    if isinstance(term, NotAlibi):
        biases.notes.append(f"{node.name}: {term.reason}")
    elif isinstance(term, AlibiTerm):
        biases.notes.append(f"{node.name}: a second ALiBi bias is kept as an additive mask")
    return False


def _conjoin(graph: fx.Graph, atoms: list[tuple[fx.Node, bool]]) -> fx.Node | None:
    """AND of the atoms, each read by truthiness (a non-boolean atom x stands for x != 0)."""
    out: fx.Node | None = None
    for node, negated in atoms:
        node = _unrepeated_heads(graph, node)
        term = node if is_bool(node) else insert_call(graph, aten.ne.Scalar, (node, 0))
        term = insert_call(graph, aten.logical_not.default, (term,)) if negated else term
        out = term if out is None else insert_call(graph, aten.logical_and.default, (out, term))
    return out


def _unrepeated_heads(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """[B, H, ...] viewed from `repeat_interleave(x, H, dim=0)` of x [B, ...] holds x for every head: x[:, None]
    (diffusers' `prepare_attention_mask` repeats a padding mask per head), so the op reads [B, 1, ...]."""
    heads, source = split_heads(node), node.args[0] if node.args else None
    if heads is None or not is_op(source, aten.repeat_interleave) or not isinstance(source, fx.Node):
        return node
    if not structure_holds(node) or not structure_holds(source):  # written in place: x is not what it holds
        return node
    x, repeats, dim = source.args[0], source.args[1] if len(source.args) > 1 else None, arg(source, 2, "dim")
    shape = shape_of(x)
    if repeats != heads or dim != 0 or shape is None or len(shape) != 3:
        return node
    return insert_call(graph, aten.unsqueeze.default, (x, 1))


def _sum(graph: fx.Graph, nodes: list[fx.Node]) -> fx.Node | None:
    out: fx.Node | None = None
    for node in nodes:
        out = node if out is None else insert_call(graph, aten.add.Tensor, (out, node))
    return out


def _mask_kind(node: fx.Node | None) -> str:
    if node is None:
        return "none"
    val = node.meta["val"]
    if val.dtype != torch.bool:
        return "additive"
    shape = val.shape
    key_padding = val.dim() >= 2 and shape[-2] == 1 and (val.dim() < 3 or shape[-3] == 1)
    return "key_padding" if key_padding else "boolean"
