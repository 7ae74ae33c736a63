"""Rewrite two-operand einsums that are batched matmuls into `matmul` (with a transpose of the second operand when
its contracted label comes last), e.g. `bhqd,bhkd->bhqk` → `a @ b.transpose(-1, -2)`, `bhqk,bhkd->bhqd` → `a @ b`.

Exact: einsum reduces such an equation to the same `bmm` call (shapes and strides) that matmul makes, provided no
batch dim broadcasts, the contracted size is not 1 (einsum multiplies instead) and, for a transposed second
operand, its free size is not 1 (a size-1 dim gets other strides). Other equations stay einsum.

`einsum_as_matmul` reads any two-operand einsum contracting one label (permuted layouts, operands swapped, a batch
axis one operand lacks) as permutes + one matmul: equal in real arithmetic only, so it is not a canonicalization:
the attention pass uses it on the Q·Kᵀ and P·V of a site it replaces, and undoes it where it declines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph import aten, insert_call, insert_equivalent, is_op, tensor_val

ELLIPSIS = "..."


def _labels(term: str) -> tuple[str, ...] | None:
    """Labels of one operand: letters, with at most one leading ellipsis kept as a single label."""
    rest = term.removeprefix(ELLIPSIS)
    if not rest.isalpha() or not rest.isascii():
        return None
    return ((ELLIPSIS,) if rest != term else ()) + tuple(rest)


def _same_bmm(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> bool:
    """Shapes for which einsum and matmul make the same bmm call (see the module docstring)."""
    if a.dim() != b.dim() or a.dim() < 3:
        return False
    if not all(statically_known_true(x == y) for x, y in zip(a.shape[:-2], b.shape[:-2], strict=True)):
        return False
    free = b.shape[-2]
    return statically_known_true(a.shape[-1] != 1) and (not transposed or statically_known_true(free != 1))


def einsum_to_matmul(node: fx.Node) -> fx.Node | None:
    """Insert the matmul form of the einsum `node` (not yet replacing it); None when the einsum stays."""
    einsum = read_einsum(node)
    form = matmul_form(einsum.equation, einsum.ranks) if einsum is not None else None
    if einsum is None or form is None:
        return None
    (a, b), (av, bv) = einsum.operands, einsum.values
    if not _same_bmm(av, bv, form.transposed):
        return None
    rhs: Any = b
    if form.transposed:
        with node.graph.inserting_before(node):
            rhs = insert_call(node.graph, aten.transpose.int, (b, -2, -1))
    matmul = insert_equivalent(node, aten.matmul.default, (a, rhs))
    if matmul is None and rhs is not b:
        node.graph.erase_node(rhs)
    return matmul


# ------------------------------------------------------------------------------- any contraction as a matmul
@dataclass(frozen=True)
class ContractionForm:
    """A two-operand einsum contracting one label, as one matmul: `left @ right`, permuted to the output's order.

    `left` is the operand holding the free label m, arranged as [*batch, m, c]; `right` the other, arranged as
    [*batch, c, n], or as [*batch, n, c] and then transposed when that is its own order (so K reads as Kᵀ).
    A batch label one operand lacks becomes a size-1 axis there (multi-query K and V without a heads axis).
    """

    swapped: bool  # the einsum's second operand is the matmul's left
    batch: tuple[str, ...]
    m: str
    c: str
    n: str
    labels: tuple[tuple[str, ...], tuple[str, ...]]  # (left, right) operands' own labels
    out: tuple[str, ...]

    @property
    def transposed(self) -> bool:
        right = self.labels[1]
        return right.index(self.n) < right.index(self.c)


def _expanded(term: str, rank: int, pool: tuple[str, ...]) -> tuple[str, ...] | None:
    """Labels of one operand with its ellipsis spelled out: the last dims of `pool` (broadcasting aligns right)."""
    labels = _labels(term)
    if labels is None or (labels[:1] != (ELLIPSIS,) and len(labels) != rank):
        return None
    if labels[:1] != (ELLIPSIS,):
        return labels
    extra = rank - (len(labels) - 1)
    return (*pool[len(pool) - extra :], *labels[1:]) if 0 <= extra <= len(pool) else None


def _terms(equation: str, ranks: tuple[int, int]) -> tuple[tuple[str, ...], ...] | None:
    """(a, b, out) labels; implicit output as torch writes it: ellipsis dims, then labels seen once, sorted."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    pool = tuple(str(i) for i in range(max(ranks)))  # digits never clash with letter labels
    a, b = (_expanded(t, r, pool) for t, r in zip(terms, ranks, strict=True))
    if a is None or b is None:
        return None
    ellipsis = pool[len(pool) - max(len([x for x in t if x.isdigit()]) for t in (a, b)) :]
    if not arrow:
        once = sorted(x for x in {*a, *b} if not x.isdigit() and (a + b).count(x) == 1)
        return a, b, (*ellipsis, *once)
    o = _labels(out)
    if o is None:
        return None
    return a, b, ((*ellipsis, *o[1:]) if o[:1] == (ELLIPSIS,) else o)


@dataclass(frozen=True)
class Einsum:
    """A two-operand einsum node's equation, operands and their fake values."""

    equation: str
    operands: tuple[Any, Any]
    values: tuple[torch.Tensor, torch.Tensor]

    @property
    def ranks(self) -> tuple[int, int]:
        return self.values[0].dim(), self.values[1].dim()


def read_einsum(node: Any) -> Einsum | None:
    """`node` as a two-operand einsum whose operands have fake values (no contraction `path` given), or None."""
    if not is_op(node, aten.einsum) or len(node.args) != 2 or node.kwargs.get("path") is not None:
        return None
    equation, operands = node.args
    if not isinstance(equation, str) or not isinstance(operands, (list, tuple)) or len(operands) != 2:
        return None
    a, b = tensor_val(operands[0]), tensor_val(operands[1])
    if a is None or b is None:
        return None
    return Einsum(equation, (operands[0], operands[1]), (a, b))


def read_contraction(equation: str, ranks: tuple[int, int]) -> ContractionForm | None:
    """The matmul reading of a two-operand einsum of operands of these ranks, or None when it is not one matmul
    (a repeated label, a label summed away alone, no contracted label or more than one)."""
    terms = _terms(equation, ranks)
    if terms is None or any(len(set(t)) != len(t) for t in terms):
        return None
    a, b, out = terms
    contracted = [x for x in a if x in b and x not in out]
    if len(contracted) != 1 or not set(a) | set(b) <= set(out) | set(contracted) or not set(out) <= set(a) | set(b):
        return None
    a_free, b_free = [x for x in out if x not in b], [x for x in out if x not in a]
    if not a_free or not b_free:
        return None
    m, n, swapped = a_free[-1], b_free[-1], False
    if out.index(m) > out.index(n):
        m, n, a, b, swapped = n, m, b, a, True
    batch = tuple(x for x in out if x not in (m, n))
    return ContractionForm(swapped, batch, m, contracted[0], n, (a, b), out)


def matmul_form(equation: str, ranks: tuple[int, int]) -> ContractionForm | None:
    """`read_contraction` of an einsum that already is `[*batch, m, c] @ [*batch, c, n]` (or `[*batch, n, c]`,
    transposed): output written out as [*batch, m, n], no permute, operands in order; else None."""
    form = read_contraction(equation, ranks) if "->" in equation else None
    if form is None or form.swapped:
        return None
    batch, (left, right) = form.batch, form.labels
    if left != (*batch, form.m, form.c) or form.out != (*batch, form.m, form.n):
        return None
    return form if right in ((*batch, form.c, form.n), (*batch, form.n, form.c)) else None


class _Inserter:
    """insert_call at the graph's insertion point, keeping the nodes it inserted in order."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.inserted: list[fx.Node] = []

    def __call__(self, target: Any, args: tuple[Any, ...]) -> fx.Node:
        self.inserted.append(insert_call(self.graph, target, args))
        return self.inserted[-1]


def _arrange(call: _Inserter, node: Any, labels: tuple[str, ...], target: tuple[str, ...]) -> Any:
    """`node` (axes `labels`) permuted to `target`'s order, size-1 axes inserted for labels it lacks."""
    perm = [labels.index(x) for x in target if x in labels]
    if perm != sorted(perm):
        node = call(aten.permute.default, (node, perm))
    for index, label in enumerate(target):
        if label not in labels:
            node = call(aten.unsqueeze.default, (node, index))
    return node


@dataclass
class MatmulReading:
    """The nodes reading one einsum as a matmul, in its place. Meanwhile the einsum stays in the graph, detached
    from its operands (so they have no extra user); `commit` erases it, `undo` puts it back."""

    einsum: fx.Node
    output: fx.Node
    inserted: list[fx.Node]
    operands: tuple[Any, ...]

    def commit(self) -> None:
        self.einsum.graph.erase_node(self.einsum)

    def undo(self) -> None:
        self.einsum.args = (self.einsum.args[0], list(self.operands))
        self.output.replace_all_uses_with(self.einsum)
        for node in reversed(self.inserted):
            self.einsum.graph.erase_node(node)


def einsum_as_matmul(node: fx.Node) -> MatmulReading | None:
    """Replace the uses of a contraction einsum by its matmul reading (`read_contraction`), inserted before it.

    Equal in real arithmetic, not bit for bit (einsum may fold the axes into another bmm), and a broadcast batch
    axis makes matmul copy the expanded operand: for a caller that then replaces the site (attention), which
    undoes the reading where it does not."""
    einsum = read_einsum(node)
    form = read_contraction(einsum.equation, einsum.ranks) if einsum is not None else None
    if einsum is None or form is None:
        return None
    left, right = einsum.operands[::-1] if form.swapped else einsum.operands
    with node.graph.inserting_before(node):
        inserted = _matmul_of(node.graph, form, left, right)
    reading = MatmulReading(node, inserted[-1], inserted, einsum.operands)
    if not _same_shape(tensor_val(reading.output), tensor_val(node)):
        reading.undo()
        return None
    node.replace_all_uses_with(reading.output)
    node.args = (einsum.equation, [])
    return reading


def _same_shape(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.dim() != b.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=True))


def _matmul_of(graph: fx.Graph, form: ContractionForm, left: Any, right: Any) -> list[fx.Node]:
    """Insert the permutes and the matmul computing `form`; the nodes inserted, in order (the last is the result)."""
    call = _Inserter(graph)
    a_labels, b_labels = form.labels
    lhs = _arrange(call, left, a_labels, (*form.batch, form.m, form.c))
    if form.transposed:
        rhs = _arrange(call, right, b_labels, (*form.batch, form.n, form.c))
        rhs = call(aten.transpose.int, (rhs, -2, -1))
    else:
        rhs = _arrange(call, right, b_labels, (*form.batch, form.c, form.n))
    out = call(aten.matmul.default, (lhs, rhs))
    order = (*form.batch, form.m, form.n)
    if order != form.out:
        call(aten.permute.default, (out, [order.index(x) for x in form.out]))
    return call.inserted
