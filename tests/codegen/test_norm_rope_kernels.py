"""Numerics of the Triton norm and RoPE kernels under the interpreter.

Each check compares against an fp64 golden (the reference run in fp64) and allows ours at most 2x (forward) or 3x
(backward) the error of the eager baseline (the reference in the same dtype) plus a rounding floor. The interpreter
rounds fp32 -> bf16 toward zero (the GPU rounds to nearest even), so bf16 results may differ from eager by one ulp;
the floor covers that, and fp16 (rounded to nearest by numpy) is tested too.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
from _sm90 import compile_in_child
from torch import Tensor

from tilefuse.codegen import custom_ops, emit
from tilefuse.codegen import reference as ref
from tilefuse.codegen.norm_kernels import (
    DEFAULT_CHUNK,
    MAX_ROW_BLOCK,
    is_chunked,
    norm_backward_triton,
    norm_forward_triton,
    row_block,
)
from tilefuse.codegen.rope_kernels import rope_backward_triton, rope_forward_triton
from tilefuse.specs import EPS_MODES, eps_mode_code, eps_mode_name

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5

# (rms, weight_offset, has_weight, has_bias, has_residual): RMSNorm variants incl. Gemma, LayerNorm variants.
NORM_VARIANTS = [
    (True, 0.0, True, False, False),
    (True, 1.0, True, False, True),
    (True, 0.0, False, False, False),
    (True, 0.0, True, True, False),
    (False, 0.0, True, True, False),
    (False, 0.0, True, False, True),
    (False, 1.0, True, True, True),
    (False, 0.0, False, False, False),
]


def _max_err(t: Tensor, golden: Tensor) -> float:
    return (t.double() - golden).abs().max().item()


def _assert_close(ours: Tensor, eager: Tensor, golden: Tensor, factor: float) -> None:
    """err(ours) <= factor * err(eager) + a floor of a few ulps of the golden's magnitude."""
    assert torch.isfinite(ours).all()
    assert ours.dtype == eager.dtype and ours.shape == eager.shape
    ulp = torch.finfo(ours.dtype).eps
    floor = 4 * ulp * (1.0 + golden.abs().max().item())
    assert _max_err(ours, golden) <= factor * _max_err(eager, golden) + floor


def _norm_inputs(
    rows: int, width: int, dtype: torch.dtype, has_weight: bool, has_bias: bool, has_residual: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    x = torch.randn(rows, width, generator=gen).to(dtype) * 2 + 0.5
    weight = torch.randn(width, generator=gen).to(dtype) if has_weight else None
    bias = torch.randn(width, generator=gen).to(dtype) if has_bias else None
    residual = torch.randn(rows, width, generator=gen).to(dtype) if has_residual else None
    return x, weight, bias, residual


def _double(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("width", [16, 59, 128])
@pytest.mark.parametrize("variant", NORM_VARIANTS)
def test_norm_forward_backward(variant: tuple[bool, float, bool, bool, bool], width: int, rows: int,
                               dtype: torch.dtype) -> None:  # fmt: skip
    _check_norm(variant, rows, width, dtype)


# Chunked rows: the kernels for rows wider than MAX_ROW_BLOCK, forced onto a small row through the launchers' block
# knob (width 200 in chunks of 64, the last one partial; 7 rows over 3 backward programs, the last one short).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", NORM_VARIANTS)
def test_chunked_norm_forward_backward(variant: tuple[bool, float, bool, bool, bool], dtype: torch.dtype) -> None:
    _check_norm(variant, 7, 200, dtype, block=64, programs=3)


# eps placements (NormSpec.eps_mode, norm_scale, eps): F.normalize's clamp of the L2 norm, eps added to the RMS, and a
# root sum of squares (norm_scale √width) with eps added to its square.
PLACEMENTS = [("clamp_norm", None, 1e-3), ("add_norm", 1.0, 1e-3), ("mean_square", None, 1e-5)]


# (variant, width, block, dtype): an RMSNorm in whole rows (bf16), a LayerNorm with a residual in chunks of 64.
PLACEMENT_CASES = [((True, 0.0, True, False, False), 59, None, torch.bfloat16),
                   ((False, 0.0, True, True, True), 200, 64, torch.float32)]  # fmt: skip


@pytest.mark.parametrize("case", PLACEMENT_CASES, ids=["rms_whole_rows", "layer_chunked"])
@pytest.mark.parametrize("placement", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_norm_eps_placements(placement: tuple[str, float | None, float], case: tuple[Any, ...]) -> None:
    """Every eps placement, whole rows and chunked, on rows of zeros and rows whose norm falls below eps (where the
    clamp holds and stops the gradient through the norm)."""
    mode, scale, eps = placement
    variant, width, block, dtype = case
    norm_scale = width**0.5 if scale is None else scale
    _check_norm(variant, 7, width, dtype, block, 3, (eps, mode, norm_scale), tiny_rows=True)


def test_an_unknown_eps_mode_is_refused_everywhere() -> None:
    """specs.EPS_MODES is the one table of eps placements: the launchers and the reference read names from it, the
    ops an index into it, and each refuses anything else (the reference's backward once took any name for add_norm)."""
    x, zeros, ones = torch.randn(3, 8), torch.zeros(3, 1), torch.ones(3, 1)
    assert [eps_mode_name(eps_mode_code(mode)) for mode in EPS_MODES] == list(EPS_MODES)
    refusals = [
        lambda: norm_forward_triton(x, None, None, None, EPS, 0.0, True, eps_mode="l2"),
        lambda: norm_backward_triton(x, x, None, None, ones, 0.0, True, eps=EPS, eps_mode="l2"),
        lambda: ref.norm_forward(x, None, None, EPS, 0.0, True, "l2"),
        lambda: ref.norm_backward(x, x, None, zeros, ones, 0.0, True, EPS, "l2"),
        lambda: custom_ops.rms_norm(x, None, EPS, 0.0, len(EPS_MODES)),
        lambda: custom_ops.norm_backward(x, x, None, EPS, 0.0, True, -1),
    ]
    for refusal in refusals:
        with pytest.raises(ValueError, match="eps_mode"):
            refusal()


def test_rms_norm_backward_op_returns_a_zero_dbias_of_the_width() -> None:
    """RMSNorm has no bias: the kernel and reference give dbias None, and tilefuse::norm_backward's schema slot
    (a width-long tensor) holds zeros; LayerNorm's is still the sum of the gradient over the rows."""
    gen = torch.Generator().manual_seed(3)
    x, grad, weight = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)
    _, _, dbias = custom_ops.norm_backward(grad, x, weight, EPS, 0.0, True)
    assert dbias.shape == (8,) and dbias.dtype == x.dtype and not dbias.any()
    _, _, layer_dbias = custom_ops.norm_backward(grad, x, weight, EPS, 0.0, False)
    torch.testing.assert_close(layer_dbias, grad.sum(dim=0))


def _check_norm(variant: tuple[bool, float, bool, bool, bool], rows: int, width: int, dtype: torch.dtype,
                block: int | None = None, programs: int | None = None,
                placement: tuple[float, str, float] = (EPS, "mean_square", 1.0),
                tiny_rows: bool = False) -> None:  # fmt: skip
    rms, offset, has_weight, has_bias, has_residual = variant
    eps, mode, norm_scale = placement
    x, weight, bias, residual = _norm_inputs(rows, width, dtype, has_weight, has_bias, has_residual)
    if tiny_rows:  # a row of zeros, and a row far below eps
        x[0], x[1] = 0.0, x[1] * 1e-5
        if residual is not None:
            residual[:2] = 0.0
    y, total, mean, rstd = norm_forward_triton(x, weight, bias, residual, eps, offset, rms, block=block,
                                               eps_mode=mode, norm_scale=norm_scale)  # fmt: skip

    eager_in = x
    if residual is not None:
        assert total is not None
        _assert_close(total, x + residual, x.double() + residual.double(), 2)
        eager_in = total  # the kernel normalizes the sum it stored; judge the norm on that same input
    eager_y, eager_mean, eager_rstd = ref.norm_forward(eager_in, weight, bias, eps, offset, rms, mode, norm_scale)
    golden_y, golden_mean, golden_rstd = ref.norm_forward(eager_in.double(), _double(weight), _double(bias), eps,
                                                          offset, rms, mode, norm_scale)  # fmt: skip
    _assert_close(y, eager_y, golden_y.to(torch.float64), 2)
    _assert_close(rstd, eager_rstd, golden_rstd, 2)
    assert (mean is None) == rms
    if mean is not None:
        _assert_close(mean, eager_mean, golden_mean, 2)

    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    knobs = dict(block=block, programs=programs)
    dx, dweight, dbias = norm_backward_triton(grad, eager_in, weight, mean, rstd, offset, rms, **knobs, eps=eps,
                                              eps_mode=mode, norm_scale=norm_scale)  # fmt: skip
    eager = ref.norm_backward(grad, eager_in, weight, eager_mean, eager_rstd, offset, rms, eps, mode, norm_scale)
    golden = ref.norm_backward(grad.double(), eager_in.double(), _double(weight), golden_mean, golden_rstd, offset,
                               rms, eps, mode, norm_scale)  # fmt: skip
    _assert_close(dx, eager[0], golden[0], 3)
    assert (dbias is None) == rms and (eager[2] is None) == rms  # RMSNorm has no bias, hence no dbias
    if dbias is not None:
        assert eager[2] is not None and golden[2] is not None
        _assert_close(dbias, eager[2], golden[2], 3)
    assert (dweight is None) == (weight is None)
    if dweight is not None:
        assert eager[1] is not None and golden[1] is not None
        _assert_close(dweight, eager[1], golden[1], 3)


@pytest.mark.parametrize("shift", [0.0, 1e3, 1e5])
def test_chunked_layer_norm_statistics_match_whole_row(shift: float) -> None:
    """Merged per-chunk statistics (Chan et al.) are as accurate as the whole row's two-pass mean and variance, also
    for rows far from zero mean (a one-pass sum of squares would lose the variance there)."""
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(1)) + shift
    golden_y, golden_mean, golden_rstd = ref.norm_forward(x.double(), None, None, EPS, 0.0, False)
    whole = norm_forward_triton(x, None, None, None, EPS, 0.0, False)
    chunked = norm_forward_triton(x, None, None, None, EPS, 0.0, False, block=64)
    floor = 4 * torch.finfo(torch.float32).eps
    for ours, base, golden in zip(chunked[::2], whole[::2], (golden_y, golden_rstd), strict=True):
        assert ours is not None and base is not None
        assert _max_err(ours, golden) <= 2 * _max_err(base, golden) + floor * (1 + golden.abs().max().item())
    assert chunked[2] is not None and whole[2] is not None
    assert _max_err(chunked[2], golden_mean) <= 2 * _max_err(whole[2], golden_mean) + floor * (1 + shift)


def test_row_block_threshold_selects_the_chunked_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole rows up to MAX_ROW_BLOCK columns, DEFAULT_CHUNK-column chunks beyond (launch recorded, not run)."""
    assert (MAX_ROW_BLOCK, DEFAULT_CHUNK) == (8192, 4096)
    assert [row_block(w) for w in (200, 8192, 8193, 16384, 65536)] == [256, 8192, 4096, 4096, 4096]
    assert not is_chunked(8192, row_block(8192)) and is_chunked(8193, row_block(8193))
    assert row_block(200, 64) == 64 and is_chunked(200, 64) and row_block(200, 1024) == 256
    with pytest.raises(ValueError, match="power of two"):
        row_block(200, 96)
    launched: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(emit, "launch", lambda kernel, grid, *args, **kw: launched.append((kernel.__name__, kw)))
    for width in (8192, 16384):
        x = torch.ones(1, width)
        _, _, mean, rstd = norm_forward_triton(x, x[0], None, None, EPS, 0.0, False)
        norm_backward_triton(x, x, x[0], mean, rstd, 0.0, False)
    norm_forward_triton(torch.ones(1, 200), None, None, None, EPS, 0.0, True, block=64, num_warps=2)
    names = [name for name, _ in launched]
    assert names == ["norm_forward_kernel", "norm_backward_kernel", "norm_forward_chunked_kernel",
                     "norm_backward_chunked_kernel", "norm_forward_chunked_kernel"]  # fmt: skip
    sizes = [(kw.get("BLOCK"), kw.get("CHUNK"), kw["num_warps"]) for _, kw in launched]
    assert sizes == [(8192, None, 32), (8192, None, 32), (None, 4096, 16), (None, 4096, 16), (None, 64, 2)]


def test_norm_forward_is_deterministic() -> None:
    x, weight, bias, residual = _norm_inputs(7, 59, torch.bfloat16, True, True, True)
    first = norm_forward_triton(x, weight, bias, residual, EPS, 0.0, False)
    second = norm_forward_triton(x, weight, bias, residual, EPS, 0.0, False)
    for a, b in zip(first, second, strict=True):
        assert a is not None and b is not None and torch.equal(a, b)


def test_norm_non_contiguous_input_is_made_contiguous() -> None:
    x = torch.randn(16, 6).t()  # [6, 16] with a strided last dim
    y, _, _, _ = norm_forward_triton(x, None, None, None, EPS, 0.0, True)
    assert torch.allclose(y, ref.norm_forward(x, None, None, EPS, 0.0, True)[0], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": torch.ones(15)}, "weight"),
        ({"x": torch.ones(2, 16, dtype=torch.float64)}, "dtype"),
        ({"residual": torch.ones(3, 16)}, "residual"),
        ({"weight": torch.ones(16, device="meta")}, "meta"),
    ],
)
def test_norm_forward_rejects_bad_arguments(kwargs: dict[str, Tensor], message: str) -> None:
    args: dict[str, Tensor | None] = {"x": torch.ones(2, 16), "weight": None, "residual": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        norm_forward_triton(args["x"], args["weight"], None, args["residual"], EPS, 0.0, True)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ RoPE
# cos/sin shapes: [N, r], [1, 1, N, r], and Hugging Face's per-batch [B, 1, N, r] (broadcast over heads).
COS_SHAPES = {"seq": (5,), "seq_4d": (1, 1, 5), "per_batch": (2, 1, 5)}


def _rope_inputs(head_dim: int, rotary_dim: int, cos_shape: str, dtype: torch.dtype) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    x = torch.randn(2, 3, 5, head_dim, generator=gen).to(dtype)
    angles = torch.randn(*COS_SHAPES[cos_shape], rotary_dim, generator=gen) * 3
    return x, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_shape", sorted(COS_SHAPES))
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(16, 16), (16, 8), (40, 40), (40, 16)])
@pytest.mark.parametrize("layout", [ref.ROPE_ROTATE_HALF, ref.ROPE_INTERLEAVED])
def test_rope_forward_backward(layout: int, head_dim: int, rotary_dim: int, cos_shape: str,
                               dtype: torch.dtype) -> None:  # fmt: skip
    x, cos, sin = _rope_inputs(head_dim, rotary_dim, cos_shape, dtype)
    y = rope_forward_triton(x, cos, sin, layout, rotary_dim)
    eager_y = ref.rope_forward(x, cos, sin, layout, rotary_dim)
    golden_y = ref.rope_forward(x.double(), cos.double(), sin.double(), layout, rotary_dim)
    _assert_close(y, eager_y, golden_y, 2)
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])

    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    dx = rope_backward_triton(grad, cos, sin, layout, rotary_dim, x.dtype)
    eager_dx = ref.rope_backward(grad, cos, sin, layout, rotary_dim, x.dtype)
    golden_dx = ref.rope_backward(grad.double(), cos.double(), sin.double(), layout, rotary_dim, torch.float64)
    _assert_close(dx, eager_dx, golden_dx, 3)


def test_rope_forward_is_deterministic() -> None:
    x, cos, sin = _rope_inputs(40, 16, "per_batch", torch.bfloat16)
    first = rope_forward_triton(x, cos, sin, ref.ROPE_INTERLEAVED, 16)
    assert torch.equal(first, rope_forward_triton(x, cos, sin, ref.ROPE_INTERLEAVED, 16))


@pytest.mark.parametrize(
    ("layout", "rotary_dim", "cos_shape", "message"),
    [
        (2, 8, (5, 8), "layout"),
        (0, 7, (5, 7), "rotary_dim"),
        (0, 8, (5, 6), "cos"),
        (0, 8, (4, 8), "broadcast"),
    ],
)
def test_rope_rejects_bad_arguments(layout: int, rotary_dim: int, cos_shape: tuple[int, ...], message: str) -> None:
    x = torch.ones(2, 5, 16)
    cos = torch.ones(cos_shape)
    with pytest.raises(ValueError, match=message):
        rope_forward_triton(x, cos, cos, layout, rotary_dim)


def test_rope_refuses_rows_past_its_32_bit_row_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's row indices are int32: the launcher refuses rows + BLOCK_ROWS past MAX_ROWS (lowered here)."""
    x, cos = torch.ones(2, 5, 16), torch.ones(5, 16)
    monkeypatch.setattr("tilefuse.codegen.rope_kernels.MAX_ROWS", 10 + 16 - 1)
    with pytest.raises(ValueError, match="32-bit row"):
        rope_forward_triton(x, cos, cos, ref.ROPE_ROTATE_HALF, 16, block_rows=16)
    monkeypatch.setattr("tilefuse.codegen.rope_kernels.MAX_ROWS", 10 + 16)
    assert torch.equal(rope_forward_triton(x, cos, cos, ref.ROPE_ROTATE_HALF, 16, block_rows=16),
                       ref.rope_forward(x, cos, cos, ref.ROPE_ROTATE_HALF, 16))  # fmt: skip


# ------------------------------------------------------------------------------------------- Hopper compile
_COMPILE_SM90 = textwrap.dedent(
    """
    import json, triton
    from triton.backends.compiler import GPUTarget
    from tilefuse.codegen.norm_kernels import (
        norm_backward_chunked_kernel, norm_backward_kernel, norm_forward_chunked_kernel, norm_forward_kernel)
    from tilefuse.codegen.rope_kernels import rope_kernel

    def build(fn, ptrs, floats, consts):
        sig = {name: "i32" for name in fn.arg_names}
        sig.update({name: "*bf16" for name in ptrs})
        sig.update({name: "fp32" for name in floats})
        sig.update({name: "constexpr" for name in consts})
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
        return sorted(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm)

    norm_fwd = ["X", "RES", "W", "B", "Y", "SUM", "MEAN", "RSTD"]
    norm_bwd = ["G", "X", "W", "MEAN", "RSTD", "DX", "DW_PARTIAL", "DB_PARTIAL"]
    fwd_floats, bwd_floats = ["eps", "weight_offset", "norm_scale"], ["weight_offset", "eps", "norm_scale"]
    report = {}
    for rms in (True, False):
        mode = 0 if rms else 1  # the default eps placement, and F.normalize's clamp
        report[f"norm_forward_rms={rms}"] = build(norm_forward_kernel, norm_fwd, fwd_floats, dict(
            BLOCK=4096, RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, HAS_RESIDUAL=True, EPS_MODE=mode))
        report[f"norm_backward_rms={rms}"] = build(norm_backward_kernel, norm_bwd, bwd_floats, dict(
            BLOCK=4096, RMS=rms, HAS_WEIGHT=True, EPS_MODE=mode))
        report[f"norm_forward_chunked_rms={rms}"] = build(norm_forward_chunked_kernel, norm_fwd, fwd_floats,
            dict(CHUNK=4096, RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, HAS_RESIDUAL=True, EPS_MODE=2))
        report[f"norm_backward_chunked_rms={rms}"] = build(norm_backward_chunked_kernel, norm_bwd, bwd_floats,
            dict(CHUNK=4096, RMS=rms, HAS_WEIGHT=True, EPS_MODE=2))
    for layout in (0, 1):
        report[f"rope_layout={layout}"] = build(rope_kernel, ["X", "COS", "SIN", "Y"], [], dict(
            BLOCK_ROWS=16, BLOCK_HALF=64, BLOCK_TAIL=64, LAYOUT=layout, BACKWARD=layout == 1, HAS_TAIL=True))
    print(json.dumps(report))
    """
)


def test_kernels_compile_for_hopper_without_gpu() -> None:
    """sm_90 compile in a child process: the interpreter replaces @triton.jit functions in this one."""
    report = compile_in_child(_COMPILE_SM90)
    assert len(report) == 10
    assert all({"ptx", "cubin"} <= set(asm) for asm in report.values())
