"""codegen.triton_compat: interpreted kernels behave alike on every supported Triton (3.6 to 3.9)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

from tilefuse.codegen import triton_compat
from tilefuse.codegen.io_count import count_io

triton = pytest.importorskip("triton", reason="triton is not installed; no kernel can run")
tl = pytest.importorskip("triton.language")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")


@triton.jit
def _count_blocks_kernel(Src, Out, n, lo, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(0, tl.cdiv(n - lo, BLOCK)):  # a loop bound computed in the kernel: a scalar tensor
        offs = lo + block * BLOCK + tl.arange(0, BLOCK)
        total += tl.load(Src + offs, mask=offs < n, other=0.0)
    tl.store(Out, tl.sum(total))


def test_loop_bound_from_a_scalar_tensor() -> None:
    """Triton 3.6's interpreter with NumPy >= 2.4 rejected `range()` over a scalar tensor without the shim."""
    src, out = torch.arange(100, dtype=torch.float32), torch.zeros(1)
    _count_blocks_kernel[(1,)](src, out, 100, 3, BLOCK=32)
    assert out.item() == sum(range(3, 100))


def test_io_count_sees_every_masked_load_and_the_store() -> None:
    """The load/store hook passes Triton's version-specific cache arguments through."""
    src, out = torch.arange(100, dtype=torch.float32), torch.zeros(1)
    with count_io() as io:
        _count_blocks_kernel[(1,)](src, out, 100, 0, BLOCK=32)
    assert (io.loads, io.read_bytes, io.stores, io.write_bytes) == (4, 400, 1, 4)


def test_shims_apply_once() -> None:
    from triton.runtime import interpreter

    before = interpreter._patch_lang_tensor
    triton_compat.apply()
    assert interpreter._patch_lang_tensor is before
