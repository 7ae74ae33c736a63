"""Build the cos/sin tables of a `tilefuse::rope` op from the coefficients a recognized rotation reads.

A coefficient of feature j is `scale_j · Π table_f[..., index_f(j)]` (rope_linear.Factor). Each table is gathered
along its trailing block with views where the indices allow it — a slice, `repeat_interleave`, `cat(t, t)`, halves
or even/odd features put together — and the factors multiplied, so the op's tables are computed in the graph from
the model's own tensors, whatever layout the model stored them in.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch.fx as fx

from .graph import aten, insert_call, is_op, static_dim, tensor_val
from .rope_linear import Coef, Factor, NotLinear, viewed

_Item = tuple[int, float]  # (flat index in the table's trailing block, scale)


@dataclass(frozen=True)
class TableSource:
    """One factor of a table: the tensor, its trailing block and which part of a complex tensor."""

    node: fx.Node
    block: tuple[int, ...]
    part: int


@dataclass(frozen=True)
class Table:
    """A per-feature table: Π sources[f][..., indices[j][f]] · scales[j] for each rotated feature j."""

    sources: tuple[TableSource, ...]
    indices: tuple[tuple[int, ...], ...]
    scales: tuple[float, ...]


def resolve(factor: Factor) -> Factor:
    """The same element read from the tensor a trailing select or slice of a table was taken from, so that entries
    of one table read through different views compare equal (torchtune's `cache[..., 0]`, `cache[..., 1]`)."""
    while True:
        node = factor.node
        if not is_op(node, aten.select, aten.slice) or factor.part != -1:
            return factor
        src = node.args[0]
        t = tensor_val(src)
        if not isinstance(src, fx.Node) or t is None:
            return factor
        width = len(factor.block) + (1 if is_op(node, aten.select) else 0)
        dim = node.args[1] if len(node.args) > 1 else 0
        if t.dim() < width or not isinstance(dim, int) or dim % t.dim() < t.dim() - width:
            return factor
        block = tuple(static_dim(d) for d in t.shape[t.dim() - width :])
        if any(d is None for d in block):
            return factor
        index = _view_index(node, block, dim % t.dim() - (t.dim() - width), factor)  # type: ignore[arg-type]
        if index is None:
            return factor
        factor = Factor(src, block, index)  # type: ignore[arg-type]


def _view_index(node: fx.Node, block: tuple[int, ...], axis: int, factor: Factor) -> int | None:
    import torch

    try:
        view = viewed(torch.arange(math.prod(block)).reshape(block), node, axis)
    except NotLinear:
        return None
    if tuple(view.shape) != factor.block:
        return None
    return int(view.flatten()[factor.index])


def table_of(coefs: list[Coef]) -> Table | None:
    """The Table of per-feature coefficients, or None when features read different tables."""
    resolved = [tuple(sorted((resolve(f) for f in c.factors), key=lambda f: (f.node.name, f.part))) for c in coefs]
    keys = {tuple((f.node, f.block, f.part) for f in r) for r in resolved}
    if len(keys) != 1:
        return None
    sources = tuple(TableSource(n, b, p) for n, b, p in next(iter(keys)))
    indices = tuple(tuple(f.index for f in r) for r in resolved)
    return Table(sources, indices, tuple(c.scale for c in coefs))


# ------------------------------------------------------------------------------------------------- building
def build(graph: fx.Graph, table: Table) -> fx.Node:
    """Insert the nodes computing `table` (a [..., r] tensor) at the current insertion point."""
    result: fx.Node | None = None
    for f, source in enumerate(table.sources):
        items = [(idx[f], table.scales[j] if f == 0 else 1.0) for j, idx in enumerate(table.indices)]
        gathered = _gather(graph, _flat(graph, source), items)
        result = gathered if result is None else insert_call(graph, aten.mul.Tensor, (result, gathered))
    if result is None:  # a coefficient that is a number only (scales of ±1 or a constant)
        raise ValueError("a rope table needs at least one tensor factor")
    return result


def _flat(graph: fx.Graph, source: TableSource) -> fx.Node:
    """The source (its real or imaginary part) with its trailing block flattened to one axis."""
    node = source.node
    if source.part >= 0:
        node = insert_call(graph, aten.view_as_real.default, (node,))
        node = insert_call(graph, aten.select.int, (node, -1, source.part))
    if not source.block:
        return insert_call(graph, aten.unsqueeze.default, (node, -1))
    if len(source.block) > 1:
        return insert_call(graph, aten.flatten.using_ints, (node, -len(source.block), -1))
    return node


def _gather(graph: fx.Graph, node: fx.Node, items: list[_Item]) -> fx.Node:
    """node[..., [i for i, _]] · [s for _, s], built from slices, repeats and joins of halves or even/odd items."""
    scales = {s for _, s in items}
    if len(scales) == 1 and scales != {1.0}:
        unit = _gather(graph, node, [(i, 1.0) for i, _ in items])
        (scale,) = scales
        if scale == -1.0:
            return insert_call(graph, aten.neg.default, (unit,))
        return insert_call(graph, aten.mul.Tensor, (unit, scale))
    n, indices = len(items), [i for i, _ in items]
    if scales == {1.0} and _is_progression(indices):
        return _slice(graph, node, indices)
    for k in (2, 3, 4):
        if n % k == 0 and n > k and all(items[j] == items[j - j % k] for j in range(n)):
            return insert_call(graph, aten.repeat_interleave.self_int, (_gather(graph, node, items[::k]), k, -1))
    for m in range(1, n // 2 + 1):
        if n % m == 0 and all(items[j] == items[j % m] for j in range(n)):
            part = _gather(graph, node, items[:m])
            return insert_call(graph, aten.cat.default, ([part] * (n // m), -1))
    if n % 2 == 0 and n > 2:
        if _is_simple(items[: n // 2]) and _is_simple(items[n // 2 :]):
            halves = [_gather(graph, node, items[: n // 2]), _gather(graph, node, items[n // 2 :])]
            return insert_call(graph, aten.cat.default, (halves, -1))
        pairs = [_gather(graph, node, items[0::2]), _gather(graph, node, items[1::2])]
        stacked = insert_call(graph, aten.stack.default, (pairs, -1))
        return insert_call(graph, aten.flatten.using_ints, (stacked, -2, -1))
    parts = [_gather(graph, node, [item]) for item in items]
    return insert_call(graph, aten.cat.default, (parts, -1))


def _is_simple(items: list[_Item]) -> bool:
    """One slice, possibly scaled."""
    return len({s for _, s in items}) == 1 and _is_progression([i for i, _ in items])


def _is_progression(indices: list[int]) -> bool:
    if len(indices) == 1:
        return True
    step = indices[1] - indices[0]
    return step > 0 and all(b - a == step for a, b in itertools.pairwise(indices))


def _slice(graph: fx.Graph, node: fx.Node, indices: list[int]) -> fx.Node:
    width = static_dim(tensor_val(node).shape[-1])  # type: ignore[union-attr]
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if indices[0] == 0 and step == 1 and len(indices) == width:
        return node
    stop = indices[-1] + 1
    return insert_call(graph, aten.slice.Tensor, (node, -1, indices[0], stop, step))


def deinterleave(graph: fx.Graph, x: fx.Node, size: int) -> fx.Node:
    """x with its even features first, then its odd ones (at the current insertion point)."""
    pairs = insert_call(graph, aten.unflatten.int, (x, -1, [size // 2, 2]))
    halves = insert_call(graph, aten.transpose.int, (pairs, -1, -2))
    return insert_call(graph, aten.flatten.using_ints, (halves, -2, -1))
