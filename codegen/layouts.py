"""Output layouts of the fused ops: the memory order of a dense tensor's dims, and outputs allocated in it.

A fused op must return its output with the strides of the node it replaces, so code that views it keeps working
(SDPA's output is a [B, N, H, D] buffer seen as [B, H, N, D]; elementwise RoPE keeps a transposed q's layout). The
rewrite reads the replaced node's order (`dim_order`) and passes it to the op as `out_order`; the fake and every
real implementation allocate with `empty_in_order` (the kernels write through the strides) or copy with `in_order`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import optimization_hint, statically_known_true


def _hint(x: Any) -> int:
    """An int for a size or stride, the example value of a symbolic one (the order is fixed at trace time, as
    Dynamo's guards on input strides fix it)."""
    return x if isinstance(x, int) else optimization_hint(x, fallback=1)


def check_order(order: Sequence[int] | None, ndim: int) -> None:
    """Raise ValueError unless `order` is None or a permutation of range(ndim)."""
    if order is not None and sorted(order) != list(range(ndim)):
        raise ValueError(f"out_order {list(order)} is not a permutation of the output's {ndim} dims")


def strides_in_order(shape: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """The dense strides of `shape` with dims laid out outermost to innermost as `order` lists them."""
    strides: list[Any] = [0] * len(shape)
    step: Any = 1
    for dim in reversed(order):
        strides[dim] = step
        step = step * shape[dim]
    return strides


def empty_in_order(shape: Sequence[Any], order: Sequence[int] | None, *, dtype: torch.dtype,
                   device: torch.device) -> Tensor:  # fmt: skip
    """An uninitialized tensor of `shape` laid out in `order` (None: contiguous)."""
    check_order(order, len(shape))
    if order is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.empty_strided(tuple(shape), strides_in_order(shape, order), dtype=dtype, device=device)


def _significant(shape: Sequence[Any], strides: Sequence[Any]) -> list[tuple[int, int]]:
    """(dim, stride) of the dims that decide a layout: a dim of size 1 may have any stride."""
    return [(d, _hint(s)) for d, (n, s) in enumerate(zip(shape, strides, strict=True)) if _hint(n) != 1]


def provably_same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether a and b have one shape and the same strides on every dim that can exceed size 1 (what views depend
    on; dtype and device aside), for every value their symbolic sizes can take: agreement at the example sizes is
    not enough, and nothing is guarded on (`statically_known_true`). On real tensors: plain equality."""
    if a.dim() != b.dim() or not all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=True)):
        return False
    strides = zip(a.shape, a.stride(), b.stride(), strict=True)
    return all(statically_known_true(n == 1) or statically_known_true(x == y) for n, x, y in strides)


def in_order(t: Tensor, order: Sequence[int] | None) -> Tensor:
    """t laid out exactly as `empty_in_order` lays it out (None: contiguous): t itself, t restrided where only
    its size-1 dims differ (no copy), else a copy."""
    check_order(order, t.dim())
    target = strides_in_order(t.shape, order if order is not None else range(t.dim()))
    if list(t.stride()) == target:
        return t
    if _significant(t.shape, t.stride()) == _significant(t.shape, target):
        return t.as_strided(t.shape, target, t.storage_offset())
    return empty_in_order(t.shape, order, dtype=t.dtype, device=t.device).copy_(t)


def dim_order(t: Tensor) -> list[int] | None:
    """The dims of `t` outermost to innermost in memory, or None when t is contiguous (every op's default layout)
    or not dense (overlapping, with gaps or broadcast: no order reproduces it, so the op stays contiguous).

    Dims of equal stride (size-1 dims) keep their logical order."""
    if t.dim() < 2 or t.is_contiguous():
        return None
    shape = [_hint(n) for n in t.shape]
    strides = [_hint(s) for s in t.stride()]
    order = sorted(range(t.dim()), key=lambda d: -strides[d])
    if _significant(shape, strides) != _significant(shape, strides_in_order(shape, order)):
        return None
    return order


def inverse_order(order: Sequence[int]) -> list[int]:
    """The permutation that undoes `permute(order)`."""
    return sorted(range(len(order)), key=list(order).__getitem__)


def permuted_rows(order: Sequence[int], x: Tensor, *tables: Tensor) -> tuple[Tensor, ...]:
    """x and the tables broadcast to x's leading dims, each permuted by `order` (views, no copy): a row-wise
    kernel run on them writes a contiguous output that `.permute(inverse_order(order))` shows in x's dims, laid
    out in `order`. The last dim must stay last."""
    check_order(order, x.dim())
    if list(order)[-1] != x.dim() - 1:
        raise ValueError(f"out_order {list(order)} moves the last dim; a row-wise kernel keeps it innermost")
    lead = tuple(x.shape[:-1])
    wide = [t.reshape((1,) * (x.dim() - t.dim()) + tuple(t.shape)).expand(*lead, t.shape[-1]) for t in tables]
    return tuple(t.permute(*order) for t in (x, *wide))
