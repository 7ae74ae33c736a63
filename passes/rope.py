"""The rope pass: replace every rotary-embedding site by `tilefuse::rope(x, cos, sin, layout, rotary_dim)`.

rope_match.py recognizes the site by meaning; its cos/sin are built in the graph from the tables the model reads
(rope_tables.py). Tables are built once per distinct table and placed right after the tensors they read, so the
sites on Q and K name the same cos/sin nodes: the attention pass then folds both rope ops into attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..codegen.op_schema import ROPE
from ..specs import RopeSpec, rope_layout_code
from .base import Decline, PassContext, PassResult
from .graph import aten, dtype_of, insert_call, replace_with, static_shape, tensor_val
from .match_common import dtype_name, erase_dead, node_order, same_value, widens
from .out_layout import keep_layout, output_order
from .rope_match import RopeMatch, match_rope, rope_anchor
from .rope_tables import Table, build, deinterleave

# Tables built so far (and cos/sin pairs expanded to one shape), shared by later sites that read the same values.
_Built = list[tuple[Table, fx.Node]]


@dataclass(frozen=True)
class RopePass:
    """Recognize rotate-half, interleaved, complex and partial-rotary RoPE and rewrite it to tilefuse::rope.

    Every candidate is recorded in `ctx` as fused (on the new rope node) or declined with a reason.
    """

    name: str = "rope"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.is_enabled("rope"):
            return PassResult(gm, False)
        modified = False
        tables: _Built = []
        live = set(gm.graph.nodes)
        for node in [n for n in gm.graph.nodes if rope_anchor(n)]:
            if node not in live:
                continue
            try:
                match = match_rope(node)
            except Decline as decline:
                ctx.declined("rope", node, decline.reason, decline.spec)
                live -= getattr(decline, "covered", set())  # other anchors of the same candidate
                continue
            if match is None:
                continue
            new_node, spec = _rewrite(gm.graph, match, tables)
            ctx.fused("rope", new_node, spec)
            modified = True
            live -= erase_dead(gm.graph, match.nodes)  # later sites' legality checks see only live users
        return PassResult(gm, modified)


def _rewrite(graph: fx.Graph, m: RopeMatch, tables: _Built) -> tuple[fx.Node, RopeSpec]:
    cos, sin = _table(graph, m.cos, m.output, tables), _table(graph, m.sin, m.output, tables)
    cos, sin = _same_shape(graph, cos, sin)
    out_shape = static_shape(m.output)
    with graph.inserting_before(m.output):
        x = _x_input(graph, m, cos)
        shape, spec = static_shape(x), _spec(m, x)
        same_shape = shape == out_shape
        out_order = output_order(m.output, len(shape)) if same_shape else None  # the replaced node's strides
        layout = {"out_order": out_order} if out_order is not None else {}
        code = rope_layout_code(spec.layout)
        args = ROPE.call_args(x=x, cos=cos, sin=sin, layout=code, rotary_dim=spec.rotary_dim, **layout)
        new_node = insert_call(graph, ROPE.overload, args)
        result = new_node
        if not same_shape:  # the site ends on a view of the rotated features, e.g. [..., d/2, 2]
            trail = list(out_shape[len(shape) - 1 :])
            result = insert_call(graph, aten.unflatten.int, (new_node, -1, trail))
    new_node.meta["tilefuse_spec"] = spec
    replace_with(m.output, keep_layout(graph, result, m.output) if same_shape else result)
    return new_node, spec


def _spec(m: RopeMatch, x: fx.Node) -> RopeSpec:
    shape = static_shape(x)
    return RopeSpec(
        layout=m.layout,
        rotary_dim=m.rotary_dim,
        head_dim=shape[-1] or 0,
        shape=shape,
        dtype=dtype_name(dtype_of(x)),
        source=m.source,
    )


def _x_input(graph: fx.Graph, m: RopeMatch, cos: fx.Node) -> fx.Node:
    """x as the op reads it: whole, the slice the site rotates, or de-interleaved; cast to the dtype the model
    computed the rotation in when x is narrower (`x.float() * cos`)."""
    x = m.x
    if m.x_view == "slice":
        x = insert_call(graph, aten.slice.Tensor, (x, -1, m.start, m.start + m.width))
    elif m.x_view == "deinterleave":
        x = deinterleave(graph, x, m.rotary_dim)
    x_dtype, out_dtype, table_dtype = dtype_of(x), dtype_of(m.output), dtype_of(cos)
    if x_dtype is None or out_dtype is None or table_dtype is None:
        return x
    if torch.promote_types(x_dtype, table_dtype) != out_dtype and widens(x_dtype, out_dtype):
        x = insert_call(graph, aten._to_copy.default, (x,), {"dtype": out_dtype})
    return x


def _table(graph: fx.Graph, table: Table, output: fx.Node, built: _Built) -> fx.Node:
    """The node computing `table`: an earlier site's when it computes the same values (GPT-J computes cos/sin once
    per projection), else new nodes placed right after the tensors the table reads."""
    order = node_order(graph)
    for earlier, node in built:
        if _same_table(earlier, table) and order[node] < order[output]:
            return node
    point = max((s.node for s in table.sources), key=order.__getitem__).next
    while point.op == "placeholder":
        point = point.next
    with graph.inserting_before(point):
        node = build(graph, table)
    built.append((table, node))
    return node


def _same_table(a: Table, b: Table) -> bool:
    if (a.indices, a.scales) != (b.indices, b.scales) or len(a.sources) != len(b.sources):
        return False
    return all(
        (sa.block, sa.part) == (sb.block, sb.part) and same_value(sa.node, sb.node)
        for sa, sb in zip(a.sources, b.sources, strict=True)
    )


def _same_shape(graph: fx.Graph, cos: fx.Node, sin: fx.Node) -> tuple[fx.Node, fx.Node]:
    """cos and sin expanded to one shape (the kernels read both through the same broadcast), right after the
    later of the two so that both sites of Q and K share them."""
    c, s = tensor_val(cos), tensor_val(sin)
    if c is None or s is None or c.shape == s.shape:
        return cos, sin
    shape = list(torch.broadcast_shapes(c.shape, s.shape))
    order = node_order(graph)
    existing = [u for u in cos.users if u.target is aten.expand.default and u.meta.get("tilefuse_rope_pair") is sin]
    twin = [u for u in sin.users if u.target is aten.expand.default and u.meta.get("tilefuse_rope_pair") is cos]
    if existing and twin:
        return existing[0], twin[0]
    with graph.inserting_after(max((cos, sin), key=order.__getitem__)):
        pair = (
            insert_call(graph, aten.expand.default, (cos, shape)),
            insert_call(graph, aten.expand.default, (sin, shape)),
        )
    pair[0].meta["tilefuse_rope_pair"], pair[1].meta["tilefuse_rope_pair"] = sin, cos
    return pair
