"""Memory layouts for operand-stride tests: one tensor's values seen through different strides.

`strided(values, layout)` returns a tensor equal to `values` whose strides are those of `layout`; a test runs an op on
it and on `values` itself (contiguous) and expects the same answer. "expanded" first makes the values constant along
the first size->1 dim, since a stride-0 dim can only hold one value; `values_of(values, layout)` gives the values
the strided tensor really holds. `strided(...).requires_grad_()` is a leaf with those strides, so an op's backward
sees them too (saved inputs) and its gradient has the full shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

# contiguous; last two dims transposed in memory (non-unit last stride); every other element of a twice-as-wide
# buffer (last stride 2); batch (or the only dim) broadcast with stride 0; dims reversed in memory (channels-last-like);
# the two dims before the last swapped in memory (heads and sequence of a [B, N, H, D] projection seen as [B, H, N, D]).
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "reversed", "swapped")


def values_of(values: Tensor, layout: str) -> Tensor:
    """The values a tensor of this layout holds: `values`, or for "expanded" its first slice along dim 0 repeated."""
    if layout != "expanded":
        return values
    return values[:1].expand(values.shape).contiguous()


def strided(values: Tensor, layout: str) -> Tensor:
    """A tensor equal to values_of(values, layout), laid out in memory as `layout` says (a view of a fresh buffer)."""
    values = values_of(values, layout)
    if layout == "contiguous":
        return values.clone()
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "expanded":
        return values[:1].clone().expand(values.shape)
    if layout == "swapped" and values.dim() >= 3:
        return values.transpose(-3, -2).contiguous().transpose(-3, -2)
    if layout in ("reversed", "transposed", "swapped"):  # a tensor with too few dims to transpose/swap: reverse
        dims = tuple(range(values.dim() - 1, -1, -1))
        return values.permute(dims).contiguous().permute(dims)
    raise ValueError(f"unknown layout {layout!r}; allowed: {LAYOUTS}")
