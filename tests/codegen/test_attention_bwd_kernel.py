"""Numerics of the Triton attention backward under the interpreter, against an fp64 golden, and its sm_90 compile."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import textwrap

import pytest
import torch
from _sm90 import compile_in_child
from torch import Tensor

pytest.importorskip("triton", reason="triton is not installed; the Triton attention kernels cannot run")

from test_attention_fwd_kernel import DTYPES, ROPE_CASES, SHAPES, VARIANTS, _as_fp64, _make_inputs, _rope_table

from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_bwd import attention_backward_triton
from tilefuse.codegen.attention_fwd import attention_forward_triton

Grads = tuple[Tensor, Tensor, Tensor]


def _grad_out(inputs: ref.AttnInputs, seed: int = 1) -> Tensor:
    q, v = inputs.q, inputs.v
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], generator=gen).to(q.dtype)


def _backward(inputs: ref.AttnInputs, flags: ref.AttnFlags, grad_out: Tensor, **blocks: int) -> Grads:
    out, lse = attention_forward_triton(inputs, flags, **blocks)
    return attention_backward_triton(grad_out, inputs, flags, out, lse, **blocks)


def _check_against_golden(inputs: ref.AttnInputs, flags: ref.AttnFlags, **blocks: int) -> Grads:
    """Each gradient within 3x the eager same-dtype error of the fp64 golden, plus a rounding floor; finite."""
    grad_out = _grad_out(inputs)
    ours = _backward(inputs, flags, grad_out, **blocks)
    golden = ref.attention_backward(grad_out.double(), _as_fp64(inputs), flags)
    eager = ref.attention_backward(grad_out, inputs, flags)
    floor = 4 * torch.finfo(inputs.q.dtype).eps
    for name, mine, gold, base, like in zip("qkv", ours, golden, eager, inputs[:3], strict=True):
        assert mine.dtype == like.dtype and mine.shape == like.shape, f"d{name}"
        assert torch.isfinite(mine).all(), f"d{name} has non-finite values"
        err_ours = (mine.double() - gold).abs().max().item()
        err_eager = (base.double() - gold).abs().max().item()
        assert err_ours <= 3 * err_eager + floor, f"d{name}: ours {err_ours:.3g} vs eager {err_eager:.3g}"
    return ours


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 40])
def test_plain_gradients_match_golden(head_dim: int, shape: tuple[int, int], group: int, dtype: torch.dtype) -> None:
    _check_against_golden(*_make_inputs(*shape, head_dim, group, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", [*VARIANTS, "softcap", "alibi"])
def test_variant_gradients_match_golden(variant: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    _check_against_golden(*_make_inputs(*shape, 40, 2, dtype, variant))


BLOCK_CASES = [
    ("plain", (40, 33)),
    ("causal_top_left", (40, 33)),
    ("causal_bottom_right", (33, 40)),
    ("window", (40, 33)),
]


@pytest.mark.parametrize(("variant", "shape"), BLOCK_CASES, ids=[f"{v}-{s}" for v, s in BLOCK_CASES])
def test_several_blocks_and_block_skipping(variant: str, shape: tuple[int, int]) -> None:
    """16-wide tiles: dK/dV accumulate over query blocks of both q heads of a group; causal/window ranges skip."""
    _check_against_golden(*_make_inputs(*shape, 16, 2, torch.float32, variant), block_m=16, block_n=16)


@pytest.mark.parametrize("variant", ["causal_bottom_right", "key_padding", "additive"])
def test_fully_masked_rows_give_zero_gradients(variant: str) -> None:
    inputs, flags = _make_inputs(33, 20, 16, 1, torch.float32, variant)
    dq, _, _ = _check_against_golden(inputs, flags)
    _, lse = attention_forward_triton(inputs, flags)
    empty = torch.isneginf(lse)
    assert empty.any(), "the case must contain fully masked rows"
    assert (dq[empty] == 0).all()


def test_repeated_runs_are_bitwise_identical() -> None:
    inputs, flags = _make_inputs(33, 20, 40, 2, torch.bfloat16, "causal_bottom_right")
    grad_out = _grad_out(inputs)
    first, second = _backward(inputs, flags, grad_out), _backward(inputs, flags, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_non_contiguous_inputs() -> None:
    """[B, N, H, D] storage seen as [B, H, N, D] and a sliced head dim; gradients come back dense."""
    inputs, flags = _make_inputs(17, 20, 40, 2, torch.float32, "causal_bottom_right")
    q = inputs.q.transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.cat((inputs.k, inputs.k), dim=-1)[..., :40]
    v = inputs.v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check_against_golden(inputs._replace(q=q, k=k, v=v), flags)


BWD_ROPE_CASES = {  # the forward's cases, plus rotary dims that take the tl.gather epilogue (not a power of two)
    **ROPE_CASES,
    "half_full_gather": (ref.ROPE_ROTATE_HALF, 40, 40, (), True, 2),
    "half_partial_gather": (ref.ROPE_ROTATE_HALF, 24, 40, (1, 1), False, 1),
}


def _with_rope(case: str, dtype: torch.dtype, n: int = 20, lead: tuple[int, ...] | None = None) -> tuple[
    ref.AttnInputs, ref.AttnFlags]:  # fmt: skip
    layout, rotary_dim, head_dim, case_lead, causal, group = BWD_ROPE_CASES[case]
    inputs, flags = _make_inputs(n, n, head_dim, group, dtype)
    cos, sin = _rope_table(n, rotary_dim, dtype, case_lead if lead is None else lead)
    flags = flags._replace(causal=causal, rope_layout=layout, rotary_dim=rotary_dim)
    return inputs._replace(cos=cos, sin=sin), flags


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(BWD_ROPE_CASES))
def test_rope_gradients_match_golden(case: str, dtype: torch.dtype) -> None:
    """RoPE in the backward: rotated Q/K tiles, dQ/dK mapped back through RoPEᵀ in the epilogue."""
    inputs, flags = _with_rope(case, dtype)
    ours = _check_against_golden(inputs, flags)
    # The rotation must matter at this tolerance: the gradients without RoPEᵀ are far off.
    grad_out = _grad_out(inputs)
    golden = ref.attention_backward(grad_out.double(), _as_fp64(inputs), flags)
    plain = ref.attention_backward(grad_out.double(), _as_fp64(inputs._replace(cos=None, sin=None)), flags)
    for mine, gold, unrotated in zip(ours[:2], golden[:2], plain[:2], strict=True):
        assert (unrotated - gold).abs().max().item() > 10 * (mine.double() - gold).abs().max().item()


@pytest.mark.parametrize("case", ["half_full", "inter_partial"])
def test_rope_several_blocks_batch_table(case: str) -> None:
    """16-wide tiles: cos/sin rows follow each query and key block, dK sums the GQA group; a [B, 1, N, r] table."""
    inputs, flags = _with_rope(case, torch.float32, n=40, lead=(1, 1))
    cos, sin = inputs.cos, inputs.sin
    assert cos is not None and sin is not None
    inputs = inputs._replace(cos=torch.cat((cos, cos.flip(2))), sin=torch.cat((sin, -sin)))
    _check_against_golden(inputs, flags, block_m=16, block_n=16)


def _bad_arguments() -> list[tuple[str, dict[str, object], str]]:
    grad, out, lse = torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4)
    return [
        ("rope one", {"cos": torch.ones(4, 16), "sin": None}, "both cos and sin"),
        ("grad shape", {"grad_out": grad[..., :8]}, "grad_out shape"),
        ("out dtype", {"out": out.double()}, "out dtype"),
        ("lse dtype", {"lse": lse.double()}, "lse must be fp32"),
        ("lse shape", {"lse": lse[..., :3]}, "lse must be fp32"),
        ("block", {"block_m": 24}, "block_m must be a power of two"),
        ("mask", {"mask": torch.ones(3, 4, dtype=torch.bool)}, "broadcast"),
    ]


@pytest.mark.parametrize(("bad", "match"), [c[1:] for c in _bad_arguments()], ids=[c[0] for c in _bad_arguments()])
def test_invalid_arguments_raise_value_error(bad: dict[str, object], match: str) -> None:
    q, kv = torch.zeros(1, 2, 4, 16), torch.zeros(1, 1, 4, 16)
    args: dict[str, object] = {"grad_out": torch.zeros(1, 2, 4, 16), "out": torch.zeros(1, 2, 4, 16)}
    args.update(lse=torch.zeros(1, 2, 4), cos=None, sin=None, mask=None, block_m=64)
    args.update(bad)
    inputs = ref.AttnInputs(q, kv, kv, args["mask"], None, args["cos"], args["sin"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        attention_backward_triton(
            args["grad_out"], inputs, ref.AttnFlags(scale=0.25), args["out"], args["lse"],  # type: ignore[arg-type]
            block_m=args["block_m"],  # type: ignore[arg-type]
        )  # fmt: skip


_COMPILE_SM90 = textwrap.dedent(
    """
    import json, triton
    from triton.backends.compiler import GPUTarget
    from tilefuse.codegen import attention_bwd as bwd
    consts = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128, CAUSAL=True, USE_WINDOW=True, MASK_KIND=1,
                  HAS_SOFTCAP=True, HAS_ALIBI=True, INPUT_PRECISION="tf32", UPCAST_DOT=False,
                  ROPE_LAYOUT=0, SWAP_SPAN=128, HAS_DROPOUT=True, SKIP_TILES=True)
    report = {}
    for fn in (bwd.attention_bwd_dkdv_kernel, bwd.attention_bwd_dq_kernel):
        sig = {name: "i32" for name in fn.arg_names}
        sig.update({name: "*bf16" for name in ("Q", "K", "V", "DO", "DQ", "DK", "DV") if name in fn.arg_names})
        sig.update(Lse="*fp32", Delta="*fp32", Mask="*u8", Alibi="*fp32", Cos="*bf16", Sin="*bf16", Rng="*i64",
                   BlockIdx="*i32", BlockCount="*i32")
        sig.update(sm_scale="fp32", qk_scale="fp32", softcap_log2="fp32", drop_p="fp32", drop_scale="fp32")
        sig.update({name: "constexpr" for name in consts})
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
        report[fn.__name__] = {"cubin": "cubin" in kernel.asm, "shared": kernel.metadata.shared}
    print(json.dumps(report))
    """
)


def test_compiles_for_hopper_without_gpu() -> None:
    """sm_90 compile of the dK/dV and dQ kernels, RoPE and dropout included, in a child process (the interpreter
    is on in this one)."""
    report = compile_in_child(_COMPILE_SM90)
    for name, kernel in report.items():
        assert kernel["cubin"], name
        assert kernel["shared"] <= 228 * 1024, name
