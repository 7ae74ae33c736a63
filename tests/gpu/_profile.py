"""Where the GPU tests run and at which sizes: CUDA at realistic sizes, or the CPU developer override at tiny ones.

TILEFUSE_GPU_TESTS_DEVICE=cpu (see conftest.py) runs the same tests on CPU tensors through the Triton interpreter,
with shapes shrunk so the whole directory takes minutes; every check stays the same. Every module here imports this
one before tilefuse, so the override's environment is set in time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

OVERRIDE_ENV = "TILEFUSE_GPU_TESTS_DEVICE"
ON_CPU = os.environ.get(OVERRIDE_ENV, "").strip().lower() == "cpu"
if ON_CPU:  # before tilefuse is imported: codegen/cuda_kernels.py routes CPU tensors to the kernels at import time
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["TILEFUSE_CPU_KERNELS"] = "triton"


@dataclass(frozen=True)
class Profile:
    """Sizes of one device profile. Attention cases derive their lengths from `seq` (seq/2, seq, 3·seq/2)."""

    device: torch.device
    batch: int
    kv_heads: int
    seq: int
    head_dims: tuple[int, int]  # (small, large)
    decode_kv: tuple[int, int, int]  # split-KV decode needs kv_len >= 256 (attention_decode.use_decode)
    norm_rows: int
    norm_widths: tuple[int, int, int]  # (power of two, non-power of two, wide)
    model: dict[str, int]  # tiny Llama for the capture test: hidden, heads, kv heads, layers, seq


# Kernel tests: batch, kv heads, base sequence length, head dims, decode KV lengths, norm rows and widths.
# Capture test: the tiny Llama's hidden size, heads, kv heads, layers and sequence length.
GPU = Profile(torch.device("cuda"), 2, 2, 256, (64, 128), (512, 1536, 4096), 64, (1024, 2560, 4096),
              {"hidden": 256, "heads": 4, "kv_heads": 2, "layers": 2, "seq": 128})  # fmt: skip
CPU = Profile(torch.device("cpu"), 2, 2, 32, (16, 32), (256, 320, 384), 8, (64, 80, 128),
              {"hidden": 64, "heads": 4, "kv_heads": 2, "layers": 2, "seq": 16})  # fmt: skip
PROFILE = CPU if ON_CPU else GPU
DEVICE = PROFILE.device
