"""Host-side argument checks and launch arguments shared by the attention forward and backward launchers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .reference import ROPE_INTERLEAVED, ROPE_NONE, ROPE_ROTATE_HALF, AttnFlags, AttnInputs

_LOG2E_F32 = 1.4426950408889634  # the literal the kernels multiply an additive mask by (rounded to fp32 there)

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensors(inputs: AttnInputs) -> None:
    q, k, v = inputs.q, inputs.k, inputs.v
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        if t.device != q.device:
            raise ValueError(f"devices differ: q on {q.device}, {name} on {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims {q.shape[-1]}/{v.shape[-1]} exceed the supported {MAX_HEAD_DIM}")


def _rope_active(inputs: AttnInputs, flags: AttnFlags) -> bool:
    """Whether reference.rope_qk rotates q/k: both cos and sin given and a layout other than ROPE_NONE."""
    return inputs.cos is not None and inputs.sin is not None and flags.rope_layout != ROPE_NONE


def _check_rope(inputs: AttnInputs, flags: AttnFlags) -> None:
    q, k, cos, sin = inputs.q, inputs.k, inputs.cos, inputs.sin
    if (cos is None) != (sin is None):
        raise ValueError("RoPE needs both cos and sin; got only one of them")
    if not _rope_active(inputs, flags):
        return
    assert cos is not None and sin is not None
    layout, rotary_dim = flags.rope_layout, flags.rotary_dim
    if layout not in (ROPE_ROTATE_HALF, ROPE_INTERLEAVED):
        raise ValueError(f"RoPE layout must be {ROPE_ROTATE_HALF}, {ROPE_INTERLEAVED} or {ROPE_NONE}, got {layout}")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"RoPE rotary_dim must be even and in (0, head_dim={q.shape[-1]}], got {rotary_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"devices differ: q on {q.device}, {name} on {t.device}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"RoPE {name} dtype {t.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        if torch.result_type(q, t) != q.dtype:
            # reference.rope_forward would promote the rotated q/k (and so QKᵀ) to that dtype; the kernel rounds the
            # rotated tiles to q's dtype, so it only takes tables that do not widen q.
            raise ValueError(f"RoPE {name} dtype {t.dtype} would promote q/k ({q.dtype}); cast it to q's dtype")
        if not 1 <= t.dim() <= 4 or t.shape[-1] != rotary_dim:
            raise ValueError(f"RoPE {name} shape {tuple(t.shape)} must be [..., rotary_dim={rotary_dim}], at most 4-D")
        for who, x in (("q", q), ("k", k)):
            try:
                t.expand(*x.shape[:-1], rotary_dim)
            except RuntimeError as err:
                raise ValueError(
                    f"RoPE {name} shape {tuple(t.shape)} does not broadcast to {who}'s [B, H, N, rotary_dim] "
                    f"{(*x.shape[:-1], rotary_dim)}"
                ) from err


def check_extras(inputs: AttnInputs, flags: AttnFlags) -> None:
    q = inputs.q
    _check_rope(inputs, flags)
    _check_dropout(inputs, flags)
    for name, t in (("mask", inputs.mask), ("alibi_slopes", inputs.alibi_slopes)):
        if t is not None and t.device != q.device:
            raise ValueError(f"devices differ: q on {q.device}, {name} on {t.device}")
    check_attention_mask(inputs.mask, q.shape[:3], inputs.k.shape[2])
    slopes = inputs.alibi_slopes
    if slopes is not None and tuple(slopes.shape) not in ((q.shape[1],), (q.shape[0], q.shape[1])):
        raise ValueError(f"alibi_slopes shape {tuple(slopes.shape)} must be [Hq] or [B, Hq]")
    if flags.window < 0 or flags.softcap < 0:
        raise ValueError(f"window ({flags.window}) and softcap ({flags.softcap}) must be >= 0")


def mask_dtype_problem(dtype: torch.dtype) -> str | None:
    """Why an attention mask of `dtype` is refused, or None when it is allowed: bool (True = attend) or a floating
    dtype (added to the scores). An integer 0/1 mask is ambiguous (a keep mask or a +0/+1 bias?), so, as in
    F.scaled_dot_product_attention, it is refused rather than guessed; the passes decline such a site with this."""
    if dtype == torch.bool or dtype.is_floating_point:
        return None
    return f"attention mask dtype {dtype} is not allowed: use bool (True = attend) or a floating dtype (added)"


def check_attention_mask(mask: Tensor | None, q_shape: Sequence[int], kv_len: int) -> None:
    """Raise TypeError for a mask dtype `mask_dtype_problem` refuses, ValueError for a mask that does not broadcast
    to [B, Hq, Nq, Nk] without growing it (a mask with more batches or heads than q would change the output's shape).

    q_shape is (B, Hq, Nq). Shared by tilefuse.ops.attention and the op's CPU and CUDA implementations."""
    if mask is None:
        return
    problem = mask_dtype_problem(mask.dtype)
    if problem is not None:
        raise TypeError(problem)
    target = (*q_shape, kv_len)
    try:
        fits = mask.dim() <= 4 and tuple(torch.broadcast_shapes(mask.shape, target)) == tuple(target)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"attention mask shape {tuple(mask.shape)} does not broadcast to [B, Hq, Nq, Nk] = {tuple(target)}; "
            "each of its dims must be 1 or that size"
        )


def broadcast_strides(t: Tensor | None, shape: tuple[int, ...]) -> tuple[Tensor | None, tuple[int, ...]]:
    """t expanded (stride 0 on broadcast dims, no copy) to `shape`, and its strides; zeros when t is None."""
    if t is None:
        return None, (0,) * len(shape)
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)).expand(shape)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)  # same bytes, a pointer type every backend loads
    return t, tuple(t.stride())


def _check_dropout(inputs: AttnInputs, flags: AttnFlags) -> None:
    p, rng = flags.dropout_p, inputs.rng
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p > 0.0 and (rng is None or rng.dtype != torch.int64 or tuple(rng.shape) != (2,)):
        got = "None" if rng is None else f"{rng.dtype} {tuple(rng.shape)}"
        raise ValueError(f"dropout_p={p} needs rng, an int64 tensor [seed, offset]; got {got}")


class RopeArgs(NamedTuple):
    """cos/sin (expanded, no copy) and their strides as seen from [B, Hq, Nq, r], the rotary dim and the layout."""

    cos: Tensor | None
    sin: Tensor | None
    cos_strides: tuple[int, ...]
    sin_strides: tuple[int, ...]
    rotary_dim: int
    layout: int


def rope_args(inputs: AttnInputs, flags: AttnFlags) -> RopeArgs:
    """Kernel arguments of RoPE; all zeros / None and layout ROPE_NONE when RoPE is off.

    Strides of cos/sin expanded to q's [B, Hq, Nq, r]; _check_rope made sure they expand to k's too, which gives
    the same strides (a non-broadcast head or row dim has equal sizes for q and k), so a nonzero head stride
    implies group == 1 and the kernels may index it by the kv head.
    """
    rope = _rope_active(inputs, flags)
    batch, q_heads, q_len = inputs.q.shape[:3]
    shape = (batch, q_heads, q_len, flags.rotary_dim)
    cos, cos_strides = broadcast_strides(inputs.cos if rope else None, shape)
    sin, sin_strides = broadcast_strides(inputs.sin if rope else None, shape)
    return RopeArgs(cos, sin, cos_strides, sin_strides, flags.rotary_dim if rope else 0,
                    flags.rope_layout if rope else ROPE_NONE)  # fmt: skip


def rope_swap_span(rope: RopeArgs) -> int:
    """SWAP_SPAN of the RoPE gradient epilogue: the power-of-two column group whose halves are partners, else 0.

    Interleaved pairs are 2-wide groups; rotate-half pairs d with d + r/2, a register permutation only when r is a
    power of two (it then divides the padded head dim). Otherwise (e.g. r = 40, 80, 96) the kernel uses tl.gather.
    """
    if rope.layout == ROPE_INTERLEAVED:
        return 2
    r = rope.rotary_dim
    return r if rope.layout == ROPE_ROTATE_HALF and r >= 2 and r & (r - 1) == 0 else 0


def dropout_args(inputs: AttnInputs, flags: AttnFlags) -> tuple[Tensor | None, float, float]:
    """(rng on q's device or None, p, 1/(1-p)); the kernels read seed and offset themselves (no host sync)."""
    if flags.dropout_p == 0.0 or inputs.rng is None:
        return None, 0.0, 1.0
    return inputs.rng.to(inputs.q.device, non_blocking=True), flags.dropout_p, 1.0 / (1.0 - flags.dropout_p)


def check_backward_tensors(grad_out: Tensor, inputs: AttnInputs, out: Tensor, lse: Tensor) -> None:
    q, v = inputs.q, inputs.v
    out_shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != out_shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must be [B, Hq, Nq, Dv] = {out_shape}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match q's {q.dtype}")
    if tuple(lse.shape) != out_shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [B, Hq, Nq] = {out_shape[:3]}, got {lse.dtype} {tuple(lse.shape)}")
    for name, t in (("grad_out", grad_out), ("out", out), ("lse", lse)):
        if t.device != q.device:
            raise ValueError(f"devices differ: q on {q.device}, {name} on {t.device}")


def _check_launch(block_m: int, block_n: int) -> None:
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")


class BwdConfig(NamedTuple):
    """Launch knobs of one backward kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def backward_config(
    head_dim: int, has_mask: bool = False, has_rope: bool = False, has_dropout: bool = False
) -> tuple[BwdConfig, BwdConfig]:
    """(dK/dV config, dQ config) used when the caller gives none; chosen so the sm_90 build does not spill.

    At D=128 the dQ kernel keeps q, dO and the fp32 dQ rows live across its key loop, so it takes narrow key
    blocks; RoPE adds the partner/cos/sin tiles of every rotated K (dQ) or Q (dK/dV) tile, and dropout its Philox
    state, which need smaller tiles still. `tilefuse compile-check` covers these with a launch's integer
    specialization (vectorized loads and cp.async pipelining cost registers: 64x64 dK/dV tiles spill at D=128, and
    RoPE's and dropout's dK/dV kernels need a single stage; a masked dQ kernel fits with 64-row tiles, where 32
    rows spill); the autotuner replaces them.
    """
    if head_dim <= 64 and not (has_rope or has_dropout):
        return BwdConfig(64, 64, 4, 2), BwdConfig(64, 32, 4, 2)
    if has_rope:
        return BwdConfig(32, 64, 8, 1), BwdConfig(32, 16, 8, 1)
    return BwdConfig(32, 64, 8, 1 if has_dropout else 2), BwdConfig(64 if has_mask else 32, 32, 8, 2)


def backward_configs(
    inputs: AttnInputs, flags: AttnFlags, knobs: tuple[int | None, int | None, int | None, int | None]
) -> tuple[BwdConfig, BwdConfig]:
    """The default configs with every knob the caller gave (not None) replacing it in both kernels."""
    rope = _rope_active(inputs, flags)
    head_dim = max(inputs.q.shape[-1], inputs.v.shape[-1])
    defaults = backward_config(head_dim, inputs.mask is not None, rope, flags.dropout_p > 0)
    configs = tuple(BwdConfig(*(d if k is None else k for d, k in zip(c, knobs, strict=True))) for c in defaults)
    for config in configs:
        _check_launch(config.block_m, config.block_n)
    return configs[0], configs[1]


def _zero_broadcast(t: Tensor, dims: int) -> tuple[int, ...]:
    """Strides of t's first `dims` dims, 0 where the dim has size 1 (a list the kernel shares along that dim)."""
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride()[:dims], t.shape[:dims], strict=True))


class BlockList(NamedTuple):
    """Per (batch, head, outer block) the inner blocks to visit: first the full tiles (nothing in them is masked, so
    the kernels run them in their clean loop), then the partial ones (masked loop), each in block order, then the
    blocks not visited.

    Outer/inner are query/key blocks (`mask_block_list`), or key/query blocks with by_key=True. Dims the mask
    broadcasts over have size 1 here, and stride 0 in the strides the kernel gets.
    """

    block_index: Tensor  # int32 [Bm, Hm, outer blocks, inner blocks]
    block_count: Tensor  # int32 [Bm, Hm, outer blocks, 2]: (full tiles, listed tiles = full + partial), stride 1

    def strides(self) -> tuple[int, ...]:
        return (*_zero_broadcast(self.block_index, 3), *_zero_broadcast(self.block_count, 3))


def block_list_args(tiles: BlockList | None) -> tuple[Tensor | None, Tensor | None, int, int, int, int, int, int]:
    """Kernel arguments (BlockIdx, BlockCount, their 6 strides) of a block list; Nones and zeros without one."""
    if tiles is None:
        return None, None, 0, 0, 0, 0, 0, 0
    return (tiles.block_index, tiles.block_count, *tiles.strides())  # type: ignore[return-value]


def _mask_tiles(
    mask: Tensor, q_len: int, kv_len: int, block_m: int, block_n: int, by_key: bool = False
) -> tuple[Tensor, Tensor]:
    """(kept, whole), bool [Bm, Hm, query blocks, key blocks]: the tile holds a pair the mask keeps / the mask keeps
    every pair of it and adds nothing (bool True, additive exactly 0, so the kernel may skip the mask there).

    One pass over the mask codes each pair 2 (True, 0), 1 (a finite or NaN additive term) or 0 (False, or a term
    the kernels' fp32 `mask * log2(e)` turns into -inf: -inf, and the finfo.min fill of fp32/bf16 masks HF uses)
    and sums the codes per tile. Keys past kv_len code 0; rows past q_len repeat the last real row, so they change
    neither answer (the kernels store nothing of them). A mask broadcast over rows gives one query block (every
    query block shares it) unless by_key asks for all of them."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.dtype == torch.bool:
        codes = mask.to(torch.uint8) * 2
    else:
        # the kernels add mask.to(fp32) * log2(e) (an fp32 constant): mirror it so that a tile of finfo.min is not
        # loaded, since every score it would add to is -inf there anyway
        in_log2 = mask.to(torch.float32) * torch.tensor(_LOG2E_F32, dtype=torch.float32, device=mask.device)
        codes = (in_log2 != float("-inf")).to(torch.uint8) + (mask == 0)
    n_mb, n_nb = -(-q_len // block_m), -(-kv_len // block_n)
    rows = mask.shape[2]
    row_blocks, row_block = (n_mb, block_m) if rows > 1 else (1, 1)
    padded = codes.new_zeros(*codes.shape[:2], row_blocks * row_block, n_nb * block_n)
    padded[:, :, :rows, :kv_len] = codes
    padded[:, :, rows:, :kv_len] = codes[:, :, -1:]
    sums = padded.view(*padded.shape[:2], row_blocks, row_block, n_nb, block_n).sum(dim=(3, 5), dtype=torch.int32)
    kept, whole = sums > 0, sums == 2 * row_block * block_n
    if by_key:
        return kept.expand(*kept.shape[:2], n_mb, n_nb), whole.expand(*whole.shape[:2], n_mb, n_nb)
    return kept, whole


def _block_order(rank: Tensor) -> Tensor:
    """int32 indices that stable-sort the last dim of `rank`, contiguous: the kernels step through a list with
    stride 1."""
    return torch.sort(rank, dim=-1, stable=True).indices.to(torch.int32).contiguous()


def _block_list(kept: Tensor, full: Tensor) -> BlockList:
    """The list of bool tile tables over their last dim: full blocks, then the other kept ones, each in order."""
    index = _block_order(2 - kept.to(torch.uint8) - full.to(torch.uint8))  # full 0, partial 1, not visited 2
    count = torch.stack((full.sum(dim=-1, dtype=torch.int32), kept.sum(dim=-1, dtype=torch.int32)), dim=-1)
    return BlockList(index, count.contiguous())


def mask_block_list(
    mask: Tensor, q_len: int, kv_len: int, block_m: int, block_n: int, flags: AttnFlags, by_key: bool = False
) -> BlockList:
    """The key blocks each query block must visit: those inside its causal/window range (the same range the
    kernel computes) holding at least one key the mask keeps. A fully masked tile is never loaded. Listed first,
    and counted apart, are the full tiles: inside kv_len, kept whole by causal/window and by the mask (for every
    real row), which the kernels run without any mask code (`_full_tiles`).

    by_key=True gives the transposed list, per key block the query blocks to visit (the backward's dK/dV loop),
    within the dK/dV kernel's own query range for that key block; either way a tile holding a pair that mask and
    causal/window both keep is visited.
    Costs one read of the mask on the device and no host sync; a mask broadcast over rows (key padding) gives one
    list per (batch, head) that every query block shares (by_key: one per key block, all or none of the queries).
    """
    kept, whole = _mask_tiles(mask, q_len, kv_len, block_m, block_n, by_key)
    if flags.causal or flags.window > 0:
        kept = kept & _range_tiles(q_len, kv_len, block_m, block_n, flags, mask.device, by_key)
    full = whole & _full_tiles(q_len, kv_len, block_m, block_n, flags, mask.device, by_key)
    return _block_list(kept.transpose(2, 3), full.transpose(2, 3)) if by_key else _block_list(kept, full)


def _full_tiles(
    q_len: int, kv_len: int, block_m: int, block_n: int, flags: AttnFlags, device: torch.device, by_key: bool = False
) -> Tensor:
    """[query blocks or 1, key blocks] bool: tiles inside kv_len whose every pair causal and window keep, the same
    notion as attention_tiles.unmasked_key_blocks (forward and dQ: rows past q_len do not count, their outputs are
    not stored) and, by_key, unmasked_query_blocks (dK/dV sums over a block's rows, so all must be real queries).
    One row (shared by every query block) when nothing depends on the query block."""
    starts_n = torch.arange(0, kv_len, block_n, device=device)
    full = (starts_n + block_n <= kv_len)[None, :]
    if not (flags.causal or flags.window > 0 or by_key):
        return full
    pos_offset = kv_len - q_len if flags.bottom_right else 0
    starts_m = torch.arange(0, q_len, block_m, device=device)
    if by_key:
        full = full & (starts_m + block_m <= q_len)[:, None]
    if flags.causal:  # the block's last key at or before its first row
        full = full & (starts_n[None, :] + block_n - 1 <= starts_m[:, None] + pos_offset)
    if flags.window > 0:  # the block's first key inside the window of its last real row
        last = torch.clamp(starts_m + block_m, max=q_len) - 1 + pos_offset
        full = full & (last[:, None] - starts_n[None, :] < flags.window)
    return full


class KeptBlocks(NamedTuple):
    """Per (batch, kv head): the key blocks that some query row of the GQA group keeps a key of, in order
    (block_index[:prefix[-1]]), and prefix[j] = how many of blocks [0, j) are kept, so the kept blocks of a block
    range [a, b) are block_index[prefix[a]:prefix[b]]. Dims the mask broadcasts over have size 1 (stride 0)."""

    block_index: Tensor  # int32 [Bm, Hkv or 1, key blocks]
    block_prefix: Tensor  # int32 [Bm, Hkv or 1, key blocks + 1]

    def strides(self) -> tuple[int, ...]:
        return (*_zero_broadcast(self.block_index, 2), *_zero_broadcast(self.block_prefix, 2))


def mask_kept_blocks(mask: Tensor, q_len: int, kv_len: int, block_n: int, group: int) -> KeptBlocks:
    """The key blocks a split-KV decode tile (every query row of one kv head's group) must visit: those where the
    mask keeps some pair of the group's q heads and query rows. On the device, no host sync."""
    tiles = _mask_tiles(mask, q_len, kv_len, q_len, block_n)[0][:, :, 0]  # [Bm, Hm, key blocks], one row block
    if tiles.shape[1] > 1:  # per q head: any over each kv head's group
        tiles = tiles.reshape(tiles.shape[0], -1, group, tiles.shape[2]).any(dim=2)
    prefix = torch.nn.functional.pad(torch.cumsum(tiles, dim=-1, dtype=torch.int32), (1, 0))
    return KeptBlocks(_block_order((~tiles).to(torch.uint8)), prefix)


def _range_tiles(
    q_len: int, kv_len: int, block_m: int, block_n: int, flags: AttnFlags, device: torch.device, by_key: bool = False
) -> Tensor:
    """[query blocks, key blocks] bool: key block inside the query block's causal/window range (as the forward and
    dQ kernels compute it), or by_key: query block inside the key block's range (as the dK/dV kernel computes it)."""
    pos_offset = kv_len - q_len if flags.bottom_right else 0
    starts_m = torch.arange(0, q_len, block_m, device=device)
    if by_key:
        return _range_tiles_by_key(starts_m, q_len, kv_len, block_m, block_n, flags, pos_offset)
    lo = torch.zeros_like(starts_m)
    hi = torch.full_like(starts_m, kv_len)
    if flags.causal:
        hi = torch.minimum(hi, torch.clamp(starts_m + block_m, max=q_len) + pos_offset)
    if flags.window > 0:
        lo = torch.clamp(starts_m + pos_offset - flags.window + 1, min=0) // block_n * block_n
    starts_n = torch.arange(0, kv_len, block_n, device=device)
    return (starts_n[None, :] >= lo[:, None]) & (starts_n[None, :] < hi[:, None])


def _range_tiles_by_key(
    starts_m: Tensor, q_len: int, kv_len: int, block_m: int, block_n: int, flags: AttnFlags, pos_offset: int
) -> Tensor:
    starts_n = torch.arange(0, kv_len, block_n, device=starts_m.device)
    lo = torch.zeros_like(starts_n)
    hi = torch.full_like(starts_n, q_len)
    if flags.causal:
        lo = torch.clamp(starts_n - pos_offset, min=0) // block_m * block_m
    if flags.window > 0:
        hi = torch.minimum(hi, torch.clamp(starts_n + block_n, max=kv_len) - 1 + flags.window - pos_offset)
    return (starts_m[:, None] >= lo[None, :]) & (starts_m[:, None] < hi[None, :])
