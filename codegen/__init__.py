"""Kernels behind the tilefuse:: custom ops: reference implementations now, Triton kernels for CUDA tensors."""

from . import triton_compat

triton_compat.apply()
