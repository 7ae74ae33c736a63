"""Mask block lists in the attention backward and split-KV decode kernels: the decode lists cover every tile holding
a kept pair (test_attention_full_tiles.py checks the forward and backward lists), the kernels load only those tiles
(bytes counted per tensor under the interpreter), and the numerics stay those of the reference for masks that
broadcast (stride 0) over batch, heads, rows or keys, fully masked rows included."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

pytest.importorskip("triton", reason="triton is not installed; the Triton attention kernels cannot run")

from test_attention_bwd_kernel import _check_against_golden as check_backward
from test_attention_bwd_kernel import _grad_out
from test_attention_decode import _check_against_golden as check_decode

from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_args import mask_kept_blocks
from tilefuse.codegen.attention_bwd import attention_backward_triton
from tilefuse.codegen.attention_decode import attention_decode_triton
from tilefuse.codegen.attention_fwd import attention_forward_triton
from tilefuse.codegen.io_count import _element_bytes, watch_memory

BATCH, KV_HEADS, GROUP = 2, 2, 2


def _inputs(nq: int, nk: int, head_dim: int = 16, kv_heads: int = KV_HEADS, seed: int = 0) -> ref.AttnInputs:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, kv_heads * GROUP, nq, head_dim, generator=gen)
    k, v = (torch.randn(BATCH, kv_heads, nk, head_dim, generator=gen) for _ in range(2))
    return ref.AttnInputs(q, k, v)


def _blocky(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    """A sparse bool mask of `shape` whose last two dims keep random 16x16 tiles (and ~80% of their pairs), so
    whole tiles are empty; size-1 dims stay size 1 (broadcast, stride 0 once expanded)."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape[-2], shape[-1]
    tiles = torch.rand(*shape[:-2], -(-rows // 16), -(-cols // 16), generator=gen) > 0.5
    tiles = tiles.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :rows, :cols]
    return tiles & (torch.rand(shape, generator=gen) > 0.2)


def _key_padding(nk: int, kept: int) -> Tensor:
    mask = torch.zeros(BATCH, 1, 1, nk, dtype=torch.bool)
    mask[..., :kept] = True
    return mask


def _masks(nq: int, nk: int) -> dict[str, Tensor]:
    padding = torch.rand(BATCH, 1, 1, nk, generator=torch.Generator().manual_seed(2)) > 0.3
    padding[1] = False  # batch 1: every row fully masked
    padding[0, ..., 16:32] = False  # one empty key block in batch 0
    rows = torch.ones(BATCH, 1, nq, 1, dtype=torch.bool)
    rows[:, :, nq // 2 :] = False  # query padding, broadcast over keys: those rows fully masked
    per_head = _blocky((1, KV_HEADS * GROUP, nq, nk))
    additive = torch.zeros(nq, nk).masked_fill(~_blocky((nq, nk), seed=3), float("-inf"))
    return {"key_padding": padding, "rows": rows, "per_head": per_head, "2d_additive": additive}


FLAGS = {"plain": ref.AttnFlags(0.25), "causal_br": ref.AttnFlags(0.25, causal=True, bottom_right=True)}
# (mask, flags): each broadcast pattern once with and once without causal, over two kernels' worth of cases
MASK_CASES = [("key_padding", "causal_br"), ("rows", "plain"), ("per_head", "causal_br"), ("2d_additive", "plain")]


@contextmanager
def _bytes_read(tensors: dict[str, Tensor]) -> Iterator[dict[str, int]]:
    """Bytes interpreted kernels load from each named tensor (io_count's hook, split by address range)."""
    spans = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in tensors.items()}
    counts = dict.fromkeys(tensors, 0)

    def load(ptrs: Any, mask: Any) -> None:
        addrs = np.broadcast_to(np.asarray(ptrs.data), np.shape(ptrs.data))
        active = addrs[np.broadcast_to(np.asarray(mask.data), addrs.shape)].astype(np.int64)
        for name, (lo, hi) in spans.items():
            counts[name] += int(np.count_nonzero((active >= lo) & (active < hi))) * _element_bytes(ptrs)

    with watch_memory(on_load=load):
        yield counts


# ------------------------------------------------------------------------------------------------ the lists
@pytest.mark.parametrize("shape", [(2, 1, 1, 70), (1, 4, 3, 70), (2, 4, 3, 1), (3, 70)], ids=str)
def test_kept_blocks_reduce_over_the_group(shape: tuple[int, ...]) -> None:
    """Per (batch, kv head): the key blocks where some q head of the group keeps a key in some row, and prefix
    counts that locate any block range's kept blocks in that list."""
    q_len, kv_len, bn, group = 3, 70, 16, 2
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(4)) > 0.93
    kept = mask_kept_blocks(torch.zeros(shape).masked_fill(~mask, float("-inf")), q_len, kv_len, bn, group)
    full = mask.expand(2, 4, q_len, kv_len)
    for b, kvh in itertools.product(range(2), range(2)):
        heads = full[b, kvh * group : (kvh + 1) * group]
        want = [nb for nb in range(-(-kv_len // bn)) if heads[..., nb * bn : (nb + 1) * bn].any()]
        ib, ih = min(b, kept.block_index.shape[0] - 1), min(kvh, kept.block_index.shape[1] - 1)
        prefix = kept.block_prefix[ib, ih].tolist()
        assert kept.block_index[ib, ih, : prefix[-1]].tolist() == want
        assert prefix == [sum(nb < j for nb in want) for j in range(len(prefix))]


# ------------------------------------------------------------------------------------------- the kernels
@pytest.mark.parametrize(("mask", "flags"), MASK_CASES, ids=str)
def test_backward_with_skipped_tiles_matches_golden(mask: str, flags: str) -> None:
    inputs = _inputs(40, 33)
    check_backward(inputs._replace(mask=_masks(40, 33)[mask]), FLAGS[flags], block_m=16, block_n=16)


@pytest.mark.parametrize("flags", FLAGS.keys())
@pytest.mark.parametrize("mask", [mask for mask, _ in MASK_CASES])
def test_decode_with_skipped_tiles_matches_golden(mask: str, flags: str) -> None:
    """3 splits over 7 key blocks: some splits keep no block at all and must weigh 0 in the combine."""
    inputs = _inputs(2, 100)
    check_decode(inputs._replace(mask=_masks(2, 100)[mask]), FLAGS[flags], block_n=16, num_splits=3)


def test_backward_loads_half_the_tiles_when_padding_kills_half_the_keys() -> None:
    """Every (query block, key block) tile of the padded half is skipped by both kernels: dQ loads no K/V tile
    there, dK/dV no Q/dO tile, and a dK/dV program whose key block no query visits not even its own K/V tile (it
    stores zeros). So Q loses exactly those tiles' bytes, K and V halve; the gradients still match the golden."""
    n, d, block = 64, 16, 16
    inputs, flags = _inputs(n, n, d, kv_heads=1), ref.AttnFlags(0.25)
    grad_out = _grad_out(inputs)

    def read(mask: Tensor) -> dict[str, int]:
        masked = inputs._replace(mask=mask)
        out, lse = attention_forward_triton(masked, flags, block_m=block, block_n=block)
        with _bytes_read({"q": inputs.q, "k": inputs.k, "v": inputs.v}) as counts:
            attention_backward_triton(grad_out, masked, flags, out, lse, block_m=block, block_n=block)
        return counts

    every, half = read(_key_padding(n, n)), read(_key_padding(n, n // 2))
    skipped_tiles = BATCH * GROUP * (n // block) * (n // block // 2)
    dead_key_blocks = BATCH * (n // block // 2)
    for name in "qkv":
        own = dead_key_blocks * block * d * 4 if name != "q" else 0
        assert every[name] - half[name] == skipped_tiles * block * d * 4 + own, name
    assert every["k"] == 2 * half["k"] and every["v"] == 2 * half["v"]
    check_backward(inputs._replace(mask=_key_padding(n, n // 2)), flags, block_m=block, block_n=block)


def test_dkdv_loads_its_key_block_when_one_head_of_the_group_visits_it() -> None:
    """Per q head of a GQA group, different key blocks: a dK/dV program must load its K/V tile when any head of the
    group lists a query block for it (heads 0 and 1 share kv head 0 and keep keys 0-15 and 32-47 only; heads 2 and
    3 keep nothing), and its dK/dV stay zero only where no head does."""
    n = 48
    mask = torch.zeros(1, KV_HEADS * GROUP, n, n, dtype=torch.bool)
    mask[:, 0, :, :16] = True
    mask[:, 1, :, 32:] = True
    inputs = _inputs(n, n)._replace(mask=mask)
    _, dk, dv = check_backward(inputs, ref.AttnFlags(0.25), block_m=16, block_n=16)
    assert (dv[:, 0, :16] != 0).all() and (dv[:, 0, 32:] != 0).all()
    assert (dk[:, 0, 16:32] == 0).all() and (dv[:, 0, 16:32] == 0).all() and (dv[:, 1] == 0).all()


def test_decode_loads_half_the_keys_when_padding_kills_half() -> None:
    """K and V bytes halve exactly; the splits past the kept keys load nothing and the output matches."""
    n, d = 256, 16
    inputs, flags = _inputs(1, n, d), ref.AttnFlags(0.25)

    def read(mask: Tensor) -> dict[str, int]:
        with _bytes_read({"k": inputs.k, "v": inputs.v}) as counts:
            attention_decode_triton(inputs._replace(mask=mask), flags, block_n=16, num_splits=4)
        return counts

    every, half = read(_key_padding(n, n)), read(_key_padding(n, n // 2))
    assert every["k"] == BATCH * KV_HEADS * n * d * 4 and every == {"k": 2 * half["k"], "v": 2 * half["v"]}
    check_decode(inputs._replace(mask=_key_padding(n, n // 2)), flags, block_n=16, num_splits=4)
