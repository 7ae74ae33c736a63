"""Rewrite two-operand einsums that are batched matmuls into `matmul` (with a transpose of the second operand when
its contracted label comes last), e.g. `bhqd,bhkd->bhqk` → `a @ b.transpose(-1, -2)`, `bhqk,bhkd->bhqd` → `a @ b`.

Exact: einsum reduces such an equation to the same `bmm` call (shapes and strides) that matmul makes, provided no
batch dim broadcasts, the contracted size is not 1 (einsum multiplies instead) and, for a transposed second
operand, its free size is not 1 (a size-1 dim gets other strides). Other equations stay einsum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph import aten, insert_call, insert_equivalent, is_op, tensor_val

ELLIPSIS = "..."


@dataclass(frozen=True)
class MatmulForm:
    """An einsum equation read as `P m c, P c n -> P m n` (or `P n c` for the second operand when transposed)."""

    batch: tuple[str, ...]
    transposed: bool


def _labels(term: str) -> tuple[str, ...] | None:
    """Labels of one operand: letters, with at most one leading ellipsis kept as a single label."""
    rest = term.removeprefix(ELLIPSIS)
    if not rest.isalpha() or not rest.isascii():
        return None
    return ((ELLIPSIS,) if rest != term else ()) + tuple(rest)


def parse_matmul(equation: str) -> MatmulForm | None:
    """The batched-matmul reading of `equation`, or None when its output is not exactly batch + the two free dims."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow or len(terms) != 2:
        return None
    a, b, o = (_labels(t) for t in (*terms, out))
    if a is None or b is None or o is None or len(a) < 2 or any(len(set(x)) != len(x) for x in (a, b, o)):
        return None
    batch, (m, c) = a[:-2], a[-2:]
    if o[:-2] != batch or b[:-2] != batch or len(o) != len(a) or len(b) != len(a) or o[-2] != m:
        return None
    n = o[-1]
    if len({m, c, n}) != 3 or {m, c, n} & set(batch):
        return None
    if b[-2:] == (c, n):
        return MatmulForm(batch, transposed=False)
    return MatmulForm(batch, transposed=True) if b[-2:] == (n, c) else None


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
    if not is_op(node, aten.einsum) or len(node.args) != 2 or node.kwargs.get("path") is not None:
        return None
    equation, operands = node.args
    form = parse_matmul(equation) if isinstance(equation, str) else None
    if form is None or not isinstance(operands, (list, tuple)) or len(operands) != 2:
        return None
    a, b = operands
    av, bv = tensor_val(a), tensor_val(b)
    if av is None or bv is None or not _same_bmm(av, bv, form.transposed):
        return None
    rhs: Any = b
    if form.transposed:
        with node.graph.inserting_before(node):
            rhs = insert_call(node.graph, aten.transpose.int, (b, -2, -1))
    matmul = insert_equivalent(node, aten.matmul.default, (a, rhs))
    if matmul is None and rhs is not b:
        node.graph.erase_node(rhs)
    return matmul
