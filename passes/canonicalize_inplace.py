"""Functionalize in-place ops on intermediates: `x.op_(...)` becomes `op(...)`, and what read x afterwards reads
the functional result instead.

Only when that is exact: x owns its storage (a fresh intermediate, not a placeholder, constant, view or alias),
no alias of x made before the mutation is used after it, and the functional result has x's shape, dtype and
strides. Anything else keeps its mutation, and recognizers decline around it as before.

A fresh `empty` buffer written whole through views that tile one axis before anything reads it (diffusers' Wan
RoPE: `out[..., 0::2] = a; out[..., 1::2] = b`) becomes the `stack`/`cat` of what was written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph import (
    aliases_of,
    arg,
    aten,
    insert_call,
    insert_equivalent,
    is_mutated,
    is_op,
    returns_alias,
    same_layout,
    static_dim,
)

OpOverload = torch._ops.OpOverload

# In-place ops that swap or resize a tensor's storage rather than compute its values.
_KEEP_IN_PLACE = frozenset({"set_", "resize_", "resize_as_"})
_DUNDER_FUNCTIONAL = {"__iand__": "__and__", "__ior__": "__or__", "__ixor__": "__xor__"}


def functional_variant(target: object) -> OpOverload | None:
    """`aten.div.Tensor` for `aten.div_.Tensor`: the out-of-place overload with the same arguments, or None."""
    if not isinstance(target, OpOverload) or not _mutates_only_self(target):
        return None
    name = target._schema.name.split("::")[-1]
    if name in _KEEP_IN_PLACE or target.namespace != "aten" or torch.Tag.nondeterministic_seeded in target.tags:
        return None  # random fills stay: that their functional twins draw the same numbers is not proven
    base = _DUNDER_FUNCTIONAL.get(name, name[:-1])
    overload = getattr(getattr(torch.ops.aten, base, None), target._overloadname, None)
    if not isinstance(overload, OpOverload) or overload._schema.is_mutable:
        return None
    return overload if _signature(overload) == _signature(target) else None


def _mutates_only_self(target: OpOverload) -> bool:
    """`op_(Tensor(a!) self, ...) -> Tensor(a!)`: writes its first argument only and returns it."""
    schema = target._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    returns = schema.returns
    return (
        bool(schema.arguments)
        and written == [schema.arguments[0]]
        and len(returns) == 1
        and returns[0].alias_info is not None
        and returns[0].alias_info.is_write
    )


def _signature(target: OpOverload) -> list[tuple[str, str, bool]]:
    return [(a.name, str(a.type), a.kwarg_only) for a in target._schema.arguments]


def owns_storage(node: object) -> bool:
    """True for an intermediate made by an op that returns a new tensor (not an input, constant, view or alias)."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and isinstance(node.target, OpOverload)
        and not returns_alias(node)
    )


def alias_read_after(tensor: fx.Node, mutation: fx.Node, order: dict[fx.Node, float]) -> bool:
    """True when an alias of `tensor` made before `mutation` (a view, say) is used after it: that alias would
    see the mutation, which replacing `tensor` by a new value cannot reproduce."""
    at = order[mutation]
    for alias in aliases_of(tensor) - {tensor, mutation}:
        if order[alias] < at and any(order[user] > at for user in alias.users):
            return True
    return False


def functionalize_one(node: fx.Node, order: dict[fx.Node, float]) -> fx.Node | None:
    """Rewrite the in-place call `node` when that is exact; returns the functional node, or None (left as is)."""
    functional = functional_variant(node.target)
    tensor = node.args[0] if node.args else None
    if functional is None or not isinstance(tensor, fx.Node) or not owns_storage(tensor):
        return None
    if alias_read_after(tensor, node, order):
        return None
    replacement = insert_equivalent(node, functional, node.args, dict(node.kwargs))
    if replacement is None:
        return None
    order[replacement] = order[node]
    node.replace_all_uses_with(replacement)
    for user in list(tensor.users):
        if user is not node and order[user] > order[node]:
            user.replace_input_with(tensor, replacement)
    node.graph.erase_node(node)
    return replacement


def functionalize(graph: fx.Graph) -> int:
    """Functionalize every in-place call that is safe to rewrite (in graph order); returns how many."""
    count = sum(assemble_tiled_writes(node) for node in list(graph.nodes) if is_op(node, *_FRESH))
    order: dict[fx.Node, float] = {n: float(i) for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op == "call_function" and functional_variant(node.target) is not None:
            count += functionalize_one(node, order) is not None
    return count


# ------------------------------------------------------------------------------------------------ tiled writes
# Buffers whose values are undefined until written.
_FRESH = (aten.empty_like, aten.empty, aten.new_empty, aten.empty_strided)


@dataclass(frozen=True)
class _Write:
    """`buf.select(dim, start).copy_(src)` (step 0) or `buf.slice(dim, start, stop, step).copy_(src)`."""

    copy: fx.Node
    dim: int
    start: int
    stop: int
    step: int

    @property
    def indices(self) -> range:
        return range(self.start, self.start + 1) if self.step == 0 else range(self.start, self.stop, self.step)


def assemble_tiled_writes(buf: fx.Node) -> int:
    """Replace the fresh buffer `buf`, written whole by `copy_`s into views tiling one axis, by the `stack` or
    `cat` of the written values (cast to `buf`'s dtype and broadcast to the view, as `copy_` does); 1 if done.

    Only when exact: every use of `buf` up to its last write is a view written by one `copy_` and read by
    nothing else, the views cover the axis exactly once, no written value is mutated anywhere (the assembly
    reads them all at the last write), and the result has `buf`'s layout (later in-place ops or views of it
    then see the same strides)."""
    writes = _writes_before_reads(buf)
    form = _tiling(writes, buf) if writes else None
    if form is None:
        return 0
    last, before = writes[-1].copy, writes[-1].copy.prev
    with buf.graph.inserting_before(last):
        try:
            assembled = _assemble(buf, sorted(writes, key=lambda w: w.start), form)
        except RuntimeError:  # a fake kernel rejecting the assembly: leave the writes as they are
            assembled = None
    if assembled is None or not same_layout(assembled.meta.get("val"), buf.meta.get("val")):
        while last.prev is not before:  # take back what was inserted
            buf.graph.erase_node(last.prev)
        return 0
    position = {n: i for i, n in enumerate(buf.graph.nodes)}
    for user in list(buf.users):
        if position[user] > position[last]:
            user.replace_input_with(buf, assembled)
    for write in writes:
        view = write.copy.args[0]
        buf.graph.erase_node(write.copy)
        if isinstance(view, fx.Node):
            buf.graph.erase_node(view)
    if not buf.users:
        buf.graph.erase_node(buf)
    return 1


def _writes_before_reads(buf: fx.Node) -> list[_Write]:
    """The writes through views of `buf` in graph order, when no other use of `buf` precedes the last; else []."""
    position = {n: i for i, n in enumerate(buf.graph.nodes)}
    writes, others = [], []
    for user in buf.users:
        write = _write_through(user, buf)
        if write is None:
            others.append(position[user])
        else:
            writes.append(write)
    writes.sort(key=lambda w: position[w.copy])
    if not writes or any(p <= position[writes[-1].copy] for p in others):
        return []
    return writes


def _write_through(view: fx.Node, buf: fx.Node) -> _Write | None:
    """The write when `view` is a slice or select of `buf`'s static axis whose only use is an unused `copy_`."""
    buf_val = buf.meta.get("val")
    size = buf_val.shape if isinstance(buf_val, torch.Tensor) else None
    copy = next(iter(view.users)) if len(view.users) == 1 else None
    if size is None or copy is None or copy.target is not aten.copy_.default or copy.users:
        return None
    src = copy.args[1]
    if copy.args[0] is not view or view.args[0] is not buf or view.kwargs or not isinstance(src, fx.Node):
        return None
    if is_mutated(src) or not isinstance(view.args[1], int):
        return None
    if view.target is aten.select.int:
        dim, index = view.args[1:3]
        n = static_dim(size[dim]) if isinstance(dim, int) and isinstance(index, int) else None
        return (
            _Write(copy, dim % len(size), index % n, 0, 0)
            if n and isinstance(dim, int) and isinstance(index, int)
            else None
        )
    if view.target is not aten.slice.Tensor:
        return None
    # through arg() (Any): fx's recursive Argument type passed to slice() makes mypy's overload search explode
    dim, start, stop, step = (arg(view, i, name, default) for i, name, default in _SLICE_ARGS)
    n = static_dim(size[dim]) if isinstance(dim, int) else None
    if n is None or not isinstance(dim, int) or not all(a is None or isinstance(a, int) for a in (start, stop, step)):
        return None
    start, stop, step = slice(start, stop, step).indices(n)
    return _Write(copy, dim % len(size), start, stop, step)


_SLICE_ARGS = ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1))


def _tiling(writes: list[_Write], buf: fx.Node) -> str | None:
    """'stack' (selects of every index), 'cat' (contiguous ranges) or 'interleave' (k slices of step k at offsets
    0..k-1, equally long) when the writes cover `buf`'s axis exactly once; None otherwise."""
    dims, steps = {w.dim for w in writes}, {w.step for w in writes}
    if len(dims) != 1 or len(steps) != 1:
        return None
    n = static_dim(buf.meta["val"].shape[dims.pop()])
    covered = [i for w in writes for i in w.indices]
    if n is None or len(covered) != n or set(covered) != set(range(n)):
        return None
    step = steps.pop()
    if step == 0:
        return "stack"
    if step == 1:
        return "cat"
    return "interleave" if step == len(writes) and n % step == 0 else None


def _assemble(buf: fx.Node, writes: list[_Write], form: str) -> fx.Node | None:
    """The value `buf` holds after `writes` (ordered along the axis), built from what they write."""
    parts = [_as_written(w, buf) for w in writes]
    if any(p is None for p in parts):
        return None
    graph, dim = buf.graph, writes[0].dim
    if form == "stack":
        return insert_call(graph, aten.stack.default, (parts, dim))
    if form == "cat":
        return insert_call(graph, aten.cat.default, (parts, dim))
    stacked = insert_call(graph, aten.stack.default, (parts, dim + 1))
    return insert_call(graph, aten.flatten.using_ints, (stacked, dim, dim + 1))


def _as_written(write: _Write, buf: fx.Node) -> fx.Node | None:
    """The source of `write` as `copy_` stores it: cast to `buf`'s dtype, broadcast to the view's shape."""
    src, dst = write.copy.args[1], write.copy.args[0]
    if not isinstance(src, fx.Node) or not isinstance(dst, fx.Node):
        return None
    view, value, target = dst.meta.get("val"), src.meta.get("val"), buf.meta["val"]
    if not isinstance(value, torch.Tensor) or not isinstance(view, torch.Tensor) or value.device != target.device:
        return None
    if value.dtype != target.dtype:
        src = insert_call(buf.graph, aten._to_copy.default, (src,), {"dtype": target.dtype})
    same_shape = value.dim() == view.dim() and all(
        statically_known_true(a == b) for a, b in zip(value.shape, view.shape, strict=True)
    )
    if not same_shape:
        shape = [static_dim(d) for d in view.shape]
        if None in shape:
            return None  # a symbolic size the graph holds no node for
        src = insert_call(buf.graph, aten.expand.default, (src, shape))
    return src
