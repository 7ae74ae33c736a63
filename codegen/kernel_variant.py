"""KernelVariant: one Triton kernel with a representative signature, constexprs and launch options, as
compile-check and the cost model compile it; and the loaders of every kernel a variant names.

A leaf below the family records (codegen/families/, which build variants from a Spec and a TileConfig) and
compile-check (codegen/compile_check.py, which compiles them). A loader imports its kernel lazily, so building a
variant imports no Triton kernel module; loaders are module-level functions because the cost model's feature cache
keys a variant by the loader's `module:qualname` (costmodel/features.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KernelVariant:
    """One kernel with a representative signature, constexprs and launch options."""

    name: str
    kernel: Callable[[], Any]  # returns the @triton.jit function (imported lazily)
    pointers: dict[str, str]
    floats: tuple[str, ...]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 2
    # Integer argument values of a representative launch. When given, the compile specializes as a launch does:
    # an int equal to 1 becomes a constant, multiples of 16 and every pointer get tt.divisibility=16 (enables
    # vectorized loads and cp.async pipelining; the TTGIR and shared memory differ from the unspecialized build).
    ints: dict[str, int] | None = None


def attention_fwd_kernel() -> Any:
    from .attention_fwd import attention_fwd_kernel

    return attention_fwd_kernel


def decode_split_kernel() -> Any:
    from .attention_decode import attention_decode_split_kernel

    return attention_decode_split_kernel


def decode_combine_kernel() -> Any:
    from .attention_decode import attention_decode_combine_kernel

    return attention_decode_combine_kernel


def attention_bwd_dkdv_kernel() -> Any:
    from .attention_bwd import attention_bwd_dkdv_kernel

    return attention_bwd_dkdv_kernel


def attention_bwd_dq_kernel() -> Any:
    from .attention_bwd import attention_bwd_dq_kernel

    return attention_bwd_dq_kernel


def norm_fwd_kernel() -> Any:
    from .norm_kernels import norm_forward_kernel

    return norm_forward_kernel


def norm_fwd_chunked_kernel() -> Any:
    from .norm_kernels import norm_forward_chunked_kernel

    return norm_forward_chunked_kernel


def norm_bwd_kernel() -> Any:
    from .norm_kernels import norm_backward_kernel

    return norm_backward_kernel


def norm_bwd_chunked_kernel() -> Any:
    from .norm_kernels import norm_backward_chunked_kernel

    return norm_backward_chunked_kernel


def rope_kernel() -> Any:
    from .rope_kernels import rope_kernel

    return rope_kernel
