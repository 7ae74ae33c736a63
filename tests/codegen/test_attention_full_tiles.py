"""Full tiles of a data mask (attention_args.mask_block_list): the tiles that causal/window, kv_len and the mask all
keep whole are listed first and run the kernels' clean loop, without loading the mask. The lists are checked
against a per-pair brute force (bool and additive masks, every broadcast, causal/window/bottom-right, odd sizes),
then the forward, dQ and dK/dV kernels against fp64 goldens on masks made of full tiles (GPT-2's causal buffer,
key padding, block patterns, HF-style 0 / finfo.min additive masks), the mask bytes they load, and a deliberately
wrong classification that the numerics must catch."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import itertools
import math

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton", reason="triton is not installed; the Triton attention kernels cannot run")

from test_attention_bwd_kernel import _check_against_golden as check_backward
from test_attention_bwd_kernel import _grad_out
from test_attention_fwd_kernel import _check_against_golden as check_forward
from test_attention_tile_skipping import _bytes_read

from tilefuse.codegen import attention_args
from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_args import BlockList, mask_block_list
from tilefuse.codegen.attention_bwd import attention_backward_triton
from tilefuse.codegen.attention_fwd import attention_forward_triton

BATCH, HEADS = 2, 3
Lists = dict[tuple[int, int, int], tuple[list[int], list[int]]]


def _blocky(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """(kept, free) bool of `shape` in 8x8 patches (size-1 dims stay 1): 3/5 of the patches keep every pair with
    nothing added, 1/5 drop every pair, 1/5 mix; free ⊂ kept. Tiles of 16 or 32 are then often full."""
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randint(-2, 3, (*shape[:-2], -(-shape[-2] // 8), -(-shape[-1] // 8)), generator=gen).clamp(min=0)
    patches = patches.repeat_interleave(8, -2).repeat_interleave(8, -1)[..., : shape[-2], : shape[-1]]
    draw = torch.rand(shape, generator=gen)
    kept = (patches == 0) | ((patches == 2) & (draw > 0.3))
    return kept, (patches == 0) | ((patches == 2) & (draw > 0.6))


def _additive(kept: Tensor, free: Tensor, seed: int) -> Tensor:
    """0 (some -0.0) where free, a nonzero bias where kept only, -inf or finfo.min (which the kernels' fp32
    `mask * log2(e)` turns into -inf) where dropped."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand(kept.shape, generator=gen)
    low = torch.finfo(torch.float32).min
    mask = torch.where(draw > 0.5, torch.full_like(draw, float("-inf")), torch.full_like(draw, low))
    mask = torch.where(kept, draw - 0.5, mask)
    return torch.where(free, torch.where(draw > 0.5, 0.0, -0.0), mask)


def _pair_tables(
    mask: Tensor, q_len: int, kv_len: int, flags: ref.AttnFlags, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per (b, h, row, key): the mask keeps the pair, the mask keeps it with nothing added, causal/window keep it."""
    mask = mask.expand(BATCH, heads, q_len, kv_len)
    if mask.dtype == torch.bool:
        kept, free = mask, mask
    else:  # the kernels add mask · log2(e) in fp32: a term that makes -inf (finfo.min included) drops the pair
        log2e = torch.tensor(math.log2(math.e), dtype=torch.float32)
        kept, free = mask.to(torch.float32) * log2e != float("-inf"), mask == 0
    keep = ref.keep_mask(q_len, kv_len, flags.causal, flags.bottom_right, flags.window, mask.device)
    return kept, free, torch.ones(q_len, kv_len, dtype=torch.bool) if keep is None else keep


def _in_range(mb: int, nb: int, q_len: int, kv_len: int, bm: int, bn: int, flags: ref.AttnFlags, by_key: bool) -> bool:
    """The tile lies in the kernel's causal/window block range: the forward/dQ range of query block mb, or by_key
    the dK/dV range of key block nb."""
    offset = kv_len - q_len if flags.bottom_right else 0
    if by_key:
        lo = max(nb * bn - offset, 0) // bm * bm if flags.causal else 0
        hi = min(q_len, min(nb * bn + bn, kv_len) - 1 + flags.window - offset) if flags.window else q_len
        return lo <= mb * bm < hi
    hi = min(kv_len, min(mb * bm + bm, q_len) + offset) if flags.causal else kv_len
    lo = max(mb * bm + offset - flags.window + 1, 0) // bn * bn if flags.window else 0
    return lo <= nb * bn < hi


def _brute_force(
    mask: Tensor, q_len: int, kv_len: int, bm: int, bn: int, flags: ref.AttnFlags, by_key: bool, heads: int = HEADS
) -> Lists:
    """Per (b, h, outer block): (full, partial) inner blocks in order, from a direct check of every pair. Visited:
    in the kernel's range with a pair the mask keeps (rows past q_len do not exist). Full: no key past kv_len, and
    every pair of real rows kept by causal/window and by the mask with nothing added; by_key also no row past q_len
    (the dK/dV kernel sums over a block's rows). Every tile holding a pair that mask and causal/window keep is
    visited, and full tiles are visited."""
    kept, free, keep = _pair_tables(mask, q_len, kv_len, flags, heads)
    n_mb, n_nb = -(-q_len // bm), -(-kv_len // bn)
    lists: Lists = {}
    for b, h, outer in itertools.product(range(BATCH), range(heads), range(n_nb if by_key else n_mb)):
        full, partial = [], []
        for inner in range(n_mb if by_key else n_nb):
            mb, nb = (inner, outer) if by_key else (outer, inner)
            rows, keys = slice(mb * bm, (mb + 1) * bm), slice(nb * bn, (nb + 1) * bn)
            visited = _in_range(mb, nb, q_len, kv_len, bm, bn, flags, by_key) and bool(kept[b, h, rows, keys].any())
            whole = nb * bn + bn <= kv_len and (not by_key or mb * bm + bm <= q_len)
            whole = whole and bool((free[b, h, rows, keys] & keep[rows, keys]).all())
            assert not whole or visited, (b, h, mb, nb)
            assert visited or not (kept[b, h, rows, keys] & keep[rows, keys]).any(), (b, h, mb, nb)
            if visited:
                (full if whole else partial).append(inner)
        lists[b, h, outer] = full, partial
    return lists


def _listed(tiles: BlockList, at: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    at = tuple(min(i, n - 1) for i, n in zip(at, tiles.block_index.shape[:3], strict=True))  # broadcast dims
    n_full, n_listed = tiles.block_count[at].tolist()
    index = tiles.block_index[at].tolist()
    return index[:n_full], index[n_full:n_listed]


FLAGS = {
    "none": ref.AttnFlags(1.0),
    "causal": ref.AttnFlags(1.0, causal=True),
    "causal_br": ref.AttnFlags(1.0, causal=True, bottom_right=True),
    "window_br": ref.AttnFlags(1.0, window=21, bottom_right=True),
    "causal_window": ref.AttnFlags(1.0, causal=True, window=19),
    "causal_window_br": ref.AttnFlags(1.0, causal=True, window=40, bottom_right=True),
}
MASK_SHAPES = ["full", "one_batch", "key_padding", "rows", "2d"]
# (Nq, Nk): bottom-right offsets 20, -25, 0, 14, -15, 15, 37 and 23 put the diagonal at other places in a tile
LIST_SHAPES = [(50, 70), (70, 45), (37, 37), (34, 48), (48, 33), (33, 48), (20, 57), (40, 63)]


def _mask_shape(kind: str, q_len: int, kv_len: int) -> tuple[int, ...]:
    return {
        "full": (BATCH, HEADS, q_len, kv_len),
        "one_batch": (1, HEADS, q_len, kv_len),
        "key_padding": (BATCH, 1, 1, kv_len),
        "rows": (BATCH, 1, q_len, 1),
        "2d": (q_len, kv_len),
    }[kind]


@pytest.mark.parametrize("by_key", [False, True], ids=["by_query", "by_key"])
@pytest.mark.parametrize("shape_kind", MASK_SHAPES)
@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
def test_lists_put_exactly_the_full_tiles_first(flags: ref.AttnFlags, shape_kind: str, by_key: bool) -> None:
    """Bool and additive masks over odd sizes, both bottom-right offsets' signs and unequal blocks: per (batch,
    head, outer block) the list holds the brute force's full tiles, then its partial ones, and the counts say so."""
    for (q_len, kv_len), (bm, bn) in itertools.product(LIST_SHAPES, [(16, 16), (32, 16), (16, 32)]):
        kept, free = _blocky(_mask_shape(shape_kind, q_len, kv_len), seed=q_len + bm)
        for mask in (kept, _additive(kept, free, seed=bn), torch.ones_like(kept)):
            tiles = mask_block_list(mask, q_len, kv_len, bm, bn, flags, by_key=by_key)
            assert tiles.block_index.stride(-1) == 1 and tiles.block_count.stride(-1) == 1
            for at, want in _brute_force(mask, q_len, kv_len, bm, bn, flags, by_key).items():
                assert _listed(tiles, at) == want, (mask.dtype, q_len, kv_len, bm, bn, at)


def test_a_causal_buffer_and_key_padding_leave_only_the_edges_partial() -> None:
    """GPT-2's tril buffer as a bool mask: every tile below the diagonal is full, the diagonal ones partial; a
    key-padding mask (shared list): every block before a row's first padded key is full."""
    n, block = 64, 16
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    tiles = mask_block_list(tril, n, n, block, block, ref.AttnFlags(1.0))
    for mb in range(n // block):
        assert _listed(tiles, (0, 0, mb)) == (list(range(mb)), [mb])
    lengths = torch.tensor([64, 40])
    padding = (torch.arange(n) < lengths[:, None])[:, None, None, :]
    tiles = mask_block_list(padding, n, n, block, block, ref.AttnFlags(1.0))
    assert tiles.block_index.shape[2] == 1  # one list shared by every query block
    assert _listed(tiles, (0, 0, 0)) == ([0, 1, 2, 3], []) and _listed(tiles, (1, 0, 0)) == ([0, 1], [2])
    # HF's finfo.min padding: the kernels' fp32 finfo.min · log2(e) is -inf, so an all-padding tile is not visited
    hf = torch.zeros(BATCH, 1, 1, n).masked_fill(~padding, torch.finfo(torch.float32).min)
    assert _listed(mask_block_list(hf, n, n, block, block, ref.AttnFlags(1.0)), (1, 0, 0)) == ([0, 1], [2])
    fp16 = hf.half().masked_fill(~padding, torch.finfo(torch.float16).min)  # finfo.min · log2(e) stays finite
    assert _listed(mask_block_list(fp16, n, n, block, block, ref.AttnFlags(1.0)), (1, 0, 0)) == ([0, 1], [2, 3])


# ------------------------------------------------------------------------------------------- the kernels
def _inputs(q_len: int, kv_len: int, head_dim: int = 16, group: int = 2, seed: int = 0) -> ref.AttnInputs:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, 2 * group, q_len, head_dim, generator=gen)
    k, v = (torch.randn(BATCH, 2, kv_len, head_dim, generator=gen) for _ in range(2))
    return ref.AttnInputs(q, k, v)


def _case_mask(name: str, q_len: int, kv_len: int) -> Tensor:
    if name == "gpt2_buffer":  # bias[:, :, k - q : k, :k] of a registered tril buffer: bottom-right causal as data
        return torch.ones(kv_len, kv_len, dtype=torch.bool).tril()[None, None, kv_len - q_len :, :]
    if name == "key_padding":
        return (torch.arange(kv_len) < torch.tensor([kv_len, kv_len - 29])[:, None])[:, None, None, :]
    kept, free = _blocky((BATCH, 4, q_len, kv_len), seed=5)
    if name == "blocky":
        return kept
    # finfo.min -> -inf: a row whose visible pairs are all finfo.min is a uniform average in eager but empty in
    # the kernels (finfo.min · log2(e) overflows), the fully masked row convention, not what these tests check
    mask = _additive(kept, free, seed=6)
    return mask.masked_fill(mask == torch.finfo(torch.float32).min, float("-inf"))


# (mask, flags, Nq, Nk): full tiles next to partial ones in every kernel (the last additive case adds ALiBi)
KERNEL_CASES = [
    ("gpt2_buffer", ref.AttnFlags(0.25), 40, 70),
    ("key_padding", ref.AttnFlags(0.25, causal=True, bottom_right=True), 50, 70),
    ("blocky", ref.AttnFlags(0.25, window=30), 70, 45),
    ("blocky", ref.AttnFlags(0.25, causal=True, softcap=5.0), 45, 45),
    ("additive", ref.AttnFlags(0.25), 40, 70),
    ("additive", ref.AttnFlags(0.25, causal=True, bottom_right=True), 70, 45),
]


KERNEL_IDS = [f"{case[0]}-{i}" for i, case in enumerate(KERNEL_CASES)]


@pytest.mark.parametrize(("mask", "flags", "q_len", "kv_len"), KERNEL_CASES, ids=KERNEL_IDS)
def test_kernels_with_full_and_partial_tiles_match_golden(
    mask: str, flags: ref.AttnFlags, q_len: int, kv_len: int
) -> None:
    inputs = _inputs(q_len, kv_len)._replace(mask=_case_mask(mask, q_len, kv_len))
    if mask == "additive" and flags.causal:
        inputs = inputs._replace(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    tiles = mask_block_list(inputs.mask, q_len, kv_len, 16, 16, flags)
    assert (tiles.block_count[..., 0] > 0).any() and (tiles.block_count[..., 1] > tiles.block_count[..., 0]).any()
    check_forward(inputs, flags, block_m=16, block_n=16)
    check_backward(inputs, flags, block_m=16, block_n=16)


def test_bf16_kernels_with_an_hf_padding_mask_match_golden() -> None:
    """A Hugging Face style additive mask (0 kept, finfo.min padded) in bf16: the 0 tiles run clean."""
    inputs = _inputs(33, 70)
    hf = torch.zeros(BATCH, 1, 1, 70).masked_fill(~_case_mask("key_padding", 33, 70), torch.finfo(torch.bfloat16).min)
    inputs = ref.AttnInputs(*(t.to(torch.bfloat16) for t in inputs[:3]), hf.to(torch.bfloat16))
    flags = ref.AttnFlags(0.25, causal=True, bottom_right=True)
    check_forward(inputs, flags, block_m=16, block_n=32)
    check_backward(inputs, flags, block_m=16, block_n=32)


def test_rows_past_q_len_never_reach_the_dkdv_clean_loop() -> None:
    """Key padding without causal and a steep ALiBi slope: on the 15 rows past q_len of the last query block,
    exp2 of the unmasked scores overflows (there is no lse to subtract), and the dK/dV kernel sums over a block's
    rows, so a tile holding such rows must run masked: the gradients stay finite and close to the golden. (The
    forward and dQ kernels keep rows apart and may run those tiles clean.)"""
    q_len, kv_len = 17, 70
    inputs = _inputs(q_len, kv_len)._replace(mask=_case_mask("key_padding", q_len, kv_len))
    inputs = inputs._replace(alibi_slopes=torch.tensor([3.0, 0.5, 0.25, 0.125]))
    flags = ref.AttnFlags(0.25)
    assert _listed(mask_block_list(inputs.mask, q_len, kv_len, 16, 16, flags), (0, 0, 1))[0]  # full for dQ
    by_key = mask_block_list(inputs.mask, q_len, kv_len, 16, 16, flags, by_key=True)
    assert all(_listed(by_key, (0, 0, nb)) == ([0], [1]) for nb in range(4))  # the second block is partial
    out, lse = attention_forward_triton(inputs, flags, block_m=16, block_n=16)
    grad_out = _grad_out(inputs)
    grads = attention_backward_triton(grad_out, inputs, flags, out, lse, block_m=16, block_n=16)
    as64 = ref.AttnInputs(*(t.double() if t is not None and t.is_floating_point() else t for t in inputs))
    for got, want in zip(grads, ref.attention_backward(grad_out.double(), as64, flags), strict=True):
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max()  # scores reach ~200: fp32 rounding


def _partial_mask_bytes(lists: Lists, q_len: int, kv_len: int, bm: int, bn: int, by_key: bool) -> int:
    """Mask elements the masked loop loads: every real (row, key) pair of each listed partial tile."""
    total = 0
    for (_, _, outer), (_, partial) in lists.items():
        for inner in partial:
            mb, nb = (inner, outer) if by_key else (outer, inner)
            total += (min(mb * bm + bm, q_len) - mb * bm) * (min(nb * bn + bn, kv_len) - nb * bn)
    return total


@pytest.mark.parametrize("mask", ["gpt2_buffer", "blocky"])
def test_full_tiles_load_no_mask(mask: str) -> None:
    """Bytes the kernels load from the mask tensor: exactly the partial tiles' pairs (brute-force lists), forward,
    then dQ plus dK/dV (per q head: 4 here, two kv heads of group 2)."""
    q_len, kv_len, block = 40, 70, 16
    flags = ref.AttnFlags(0.25)
    inputs = _inputs(q_len, kv_len)._replace(mask=_case_mask(mask, q_len, kv_len))
    with _bytes_read({"mask": inputs.mask}) as forward:
        out, lse = attention_forward_triton(inputs, flags, block_m=block, block_n=block)
    with _bytes_read({"mask": inputs.mask}) as backward:
        attention_backward_triton(_grad_out(inputs), inputs, flags, out, lse, block_m=block, block_n=block)
    by_query, by_key = (_brute_force(inputs.mask, q_len, kv_len, block, block, flags, b, 4) for b in (False, True))
    want = _partial_mask_bytes(by_query, q_len, kv_len, block, block, False)
    assert forward["mask"] == want > 0
    assert backward["mask"] == want + _partial_mask_bytes(by_key, q_len, kv_len, block, block, True)
    if mask == "gpt2_buffer":  # only the diagonal tiles load it
        assert want < 0.5 * BATCH * 4 * q_len * kv_len


def test_a_partial_tile_taken_as_full_breaks_the_numerics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sanity check of the tests above: when every tile the mask keeps a pair of counts as full (its mask then
    never loaded), the forward and the backward miss the golden."""
    inputs = _inputs(40, 45)._replace(mask=_case_mask("blocky", 40, 45))
    flags = ref.AttnFlags(0.25)
    tables = attention_args._mask_tiles

    def all_full(*args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        kept, _ = tables(*args, **kwargs)  # type: ignore[arg-type]
        return kept, kept

    monkeypatch.setattr(attention_args, "_mask_tiles", all_full)
    with pytest.raises(AssertionError):
        check_forward(inputs, flags, block_m=16, block_n=16)
    with pytest.raises(AssertionError):
        check_backward(inputs, flags, block_m=16, block_n=16)
