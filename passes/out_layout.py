"""Keep the strides of a replaced node: the `out_order` a fused op is given, and a check after the rewrite.

Code downstream of a site may view its output (`out.transpose(1, 2).view(b, s, -1)` after SDPA, whose output is a
[B, N, H, D] buffer seen as [B, H, N, D]); that works only if the fused op's output has the strides the traced
graph gave the node it replaces. A rewrite passes `output_order(old, ndim)` to the op (codegen/layouts.py), then
`keep_layout(graph, new, old)` copies into the old layout in the rare case the replacement still differs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..codegen.layouts import dim_order, inverse_order, provably_same_layout
from .graph import aten, insert_call, tensor_val


def output_order(replaced: fx.Node, ndim: int, first_dim_split: bool = False) -> list[int] | None:
    """The `out_order` that gives an op output of `ndim` dims the layout of `replaced` (None: contiguous, or no
    order fits).

    With `first_dim_split`, a 3-D node replaced by a 4-D op output (attention's [B, H, N, D] squeezed at dim 1,
    or with B and H flattened, as BLOOM folds heads into the batch) maps its first dim onto the op's first two.
    """
    val = tensor_val(replaced)
    order = dim_order(val) if val is not None else None
    if order is None or val is None:
        return None
    if val.dim() == ndim:
        return order
    if first_dim_split and val.dim() == 3 and ndim == 4:
        return [d for dim in order for d in ((0, 1) if dim == 0 else (dim + 1,))]
    return None


def keep_layout(graph: fx.Graph, new: fx.Node, old: fx.Node) -> fx.Node:
    """`new`, or a copy of it laid out as `old` where their strides may differ on a dim of size > 1 and old is dense;
    inserted after `new`. The strides count as equal only when they are for every value of the symbolic sizes
    (`provably_same_layout`; a dtype difference is `replace_with`'s concern)."""
    new_val, old_val = tensor_val(new), tensor_val(old)
    if new_val is None or old_val is None or provably_same_layout(new_val, old_val):
        return new
    order = dim_order(old_val) or (list(range(old_val.dim())) if old_val.is_contiguous() else None)
    if order is None or tuple(new_val.shape) != tuple(old_val.shape):
        return new  # no dense layout to copy into; the op's own stays
    with graph.inserting_before(new.next):  # in program order, right after new
        permuted = insert_call(graph, aten.permute.default, (new, order))
        dense = insert_call(graph, aten.clone.default, (permuted,), {"memory_format": torch.contiguous_format})
        return insert_call(graph, aten.permute.default, (dense, inverse_order(order)))
