"""Triton's counter-based RNG (`tl.rand`: Philox 4x32, 10 rounds) in pure torch, bit for bit.

Attention dropout draws its keep mask from `tl.rand(seed, counter)` inside the kernels; this module lets the
reference (and CPU paths) draw the identical mask without Triton, on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

N_ROUNDS = 10
MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
# tl.rand's int32 -> [0, 1) scale: the largest float with (2^31 - 1) * scale < 1 after fp32 rounding.
UINT_TO_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of a * x for 32-bit unsigned a and x held in int64.

    The 64-bit product can wrap int64, but wrapping keeps its low 64 bits, which are all we read.
    """
    prod = x * a
    return (prod >> 32) & MASK32, prod & MASK32


def _seed_words(seed: int | Tensor) -> tuple[int, int]:
    """(low, high) 32-bit words of the seed as tl.philox sees it (an integer widened to uint64)."""
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise ValueError(f"seed must be one integer, got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
        seed = int(seed.item())
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an integer tensor, got {type(seed).__name__}")
    return seed & MASK32, (seed >> 32) & MASK32


def philox_randint(seed: int | Tensor, counters: Tensor, n_rounds: int = N_ROUNDS) -> Tensor:
    """The first uint32 word of `tl.randint(seed, counters)`, as int64 values in [0, 2^32)."""
    if counters.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"counters must be int32 or int64, got {counters.dtype}")
    k0, k1 = _seed_words(seed)
    wide = counters.to(torch.int64)
    c0 = wide & MASK32
    # tl.randint4x takes the high word only from 64-bit offsets; an int32 counter has none.
    c1 = (wide >> 32) & MASK32 if counters.dtype == torch.int64 else torch.zeros_like(wide)
    c2 = torch.zeros_like(wide)
    c3 = torch.zeros_like(wide)
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0


def uniform(seed: int | Tensor, counters: Tensor) -> Tensor:
    """fp32 samples in [0, 1), bitwise equal to `tl.rand(seed, counters)` (counters int32 or int64)."""
    bits = philox_randint(seed, counters)
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)  # the uint32 bitcast to int32
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative x
    scale = torch.tensor(UINT_TO_UNIFORM_SCALE, dtype=torch.float32, device=counters.device)
    return folded.to(torch.float32) * scale
