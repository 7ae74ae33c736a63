"""Numerics of the Triton attention forward under the interpreter, against an fp64 golden, and its sm_90 compile."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import textwrap

import pytest
import torch
from _sm90 import compile_in_child
from torch import Tensor

pytest.importorskip("triton", reason="triton is not installed; the Triton attention kernel cannot run")

from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_fwd import attention_forward_triton

SHAPES = [(1, 17), (17, 17), (33, 20)]  # (Nq, Nk): single query, odd, Nq > Nk (bottom-right rows fully masked)
DTYPES = [torch.float32, torch.bfloat16]


def _make_inputs(
    nq: int, nk: int, head_dim: int, group: int, dtype: torch.dtype, variant: str = "plain", seed: int = 0
) -> tuple[ref.AttnInputs, ref.AttnFlags]:
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads = 2, 2
    q_heads = kv_heads * group

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = (
        rand(batch, q_heads, nq, head_dim),
        rand(batch, kv_heads, nk, head_dim),
        rand(batch, kv_heads, nk, head_dim),
    )
    mask = alibi = None
    flags = ref.AttnFlags(scale=head_dim**-0.5)
    if variant == "causal_top_left":
        flags = flags._replace(causal=True)
    elif variant == "causal_bottom_right":
        flags = flags._replace(causal=True, bottom_right=True)
    elif variant == "window":
        flags = flags._replace(window=5, bottom_right=True)
    elif variant == "causal_window":
        flags = flags._replace(causal=True, window=4)
    elif variant == "key_padding":
        mask = torch.rand(batch, 1, 1, nk, generator=gen) > 0.3
        mask[1] = False  # batch 1: every row fully masked
    elif variant == "additive":
        mask = torch.randn(1, q_heads, nq, nk, generator=gen).to(dtype)
        mask[..., 0, :] = float("-inf")  # one fully masked row through the additive path
    elif variant == "softcap":
        flags = flags._replace(softcap=0.7)
    elif variant == "alibi":
        alibi = torch.rand(q_heads, generator=gen)
        flags = flags._replace(causal=True)
    return ref.AttnInputs(q, k, v, mask, alibi), flags


def _as_fp64(inputs: ref.AttnInputs) -> ref.AttnInputs:
    return ref.AttnInputs(*(t.double() if t is not None and t.is_floating_point() else t for t in inputs))


def _check_against_golden(inputs: ref.AttnInputs, flags: ref.AttnFlags, **blocks: int) -> tuple[Tensor, Tensor]:
    """ours within 2x the eager same-dtype error of the fp64 golden, plus a rounding floor; finite."""
    out, lse = attention_forward_triton(inputs, flags, **blocks)
    golden = ref.attention_forward(_as_fp64(inputs), flags)
    eager = ref.attention_forward(inputs, flags)
    floor = 4 * torch.finfo(inputs.q.dtype).eps
    err_ours = (out.double() - golden).abs().max().item()
    err_eager = (eager.double() - golden).abs().max().item()
    assert out.dtype == inputs.q.dtype and out.shape == golden.shape
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    assert err_ours <= 2 * err_eager + floor, f"ours {err_ours:.3g} vs eager {err_eager:.3g}"
    return out, lse


def _golden_lse(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> Tensor:
    """logsumexp over the fp64 masked scores (softcap/ALiBi not needed by the cases that use it)."""
    q, k = inputs.q.double(), inputs.k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * flags.scale
    keep = ref.keep_mask(q.shape[2], k.shape[2], flags.causal, flags.bottom_right, flags.window, q.device)
    if inputs.mask is not None:
        keep = inputs.mask if keep is None else keep & inputs.mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 40])
def test_plain_attention_matches_golden(head_dim: int, shape: tuple[int, int], group: int, dtype: torch.dtype) -> None:
    _check_against_golden(*_make_inputs(*shape, head_dim, group, dtype))


VARIANTS = ["causal_top_left", "causal_bottom_right", "window", "causal_window", "key_padding", "additive"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", [*VARIANTS, "softcap", "alibi"])
def test_variants_match_golden(variant: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    _check_against_golden(*_make_inputs(*shape, 40, 2, dtype, variant))


@pytest.mark.parametrize("variant", ["plain", *VARIANTS, "alibi"])
@pytest.mark.parametrize("shape", [(33, 50), (50, 33)], ids=str)
def test_several_key_blocks_and_block_skipping(variant: str, shape: tuple[int, int]) -> None:
    """16-wide tiles: the online-softmax rescaling across key blocks and the causal/window block range."""
    inputs, flags = _make_inputs(*shape, 16, 2, torch.float32, variant)
    out, _ = attention_forward_triton(inputs, flags, block_m=16, block_n=16)
    golden = ref.attention_forward(_as_fp64(inputs), flags)
    eager = ref.attention_forward(inputs, flags)
    err_eager = (eager.double() - golden).abs().max().item()
    assert (out.double() - golden).abs().max().item() <= 2 * err_eager + 4 * torch.finfo(torch.float32).eps


def test_repeated_runs_are_bitwise_identical() -> None:
    inputs, flags = _make_inputs(33, 20, 40, 2, torch.bfloat16, "causal_bottom_right")
    first, second = attention_forward_triton(inputs, flags), attention_forward_triton(inputs, flags)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("variant", ["causal_bottom_right", "key_padding", "additive"])
def test_fully_masked_rows_give_zero_and_minus_inf_lse(variant: str) -> None:
    inputs, flags = _make_inputs(33, 20, 16, 1, torch.float32, variant)
    out, lse = _check_against_golden(inputs, flags)
    empty = torch.isneginf(lse)
    assert empty.any(), "the case must contain fully masked rows"
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("variant", ["plain", "causal_bottom_right", "window", "key_padding"])
def test_lse_matches_logsumexp_of_golden_scores(variant: str) -> None:
    inputs, flags = _make_inputs(33, 20, 40, 2, torch.float32, variant)
    _, lse = attention_forward_triton(inputs, flags)
    golden = _golden_lse(_as_fp64(inputs), flags)
    assert lse.dtype == torch.float32 and lse.shape == golden.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(golden))
    finite = torch.isfinite(golden)
    torch.testing.assert_close(lse[finite].double(), golden[finite], rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs() -> None:
    """[B, N, H, D] storage seen as [B, H, N, D] (the layout after a projection) and a sliced head dim."""
    inputs, flags = _make_inputs(17, 20, 40, 2, torch.float32, "causal_bottom_right")
    q = inputs.q.transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.cat((inputs.k, inputs.k), dim=-1)[..., :40]
    v = inputs.v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check_against_golden(inputs._replace(q=q, k=k, v=v), flags)


def _bad_arguments() -> list[tuple[str, ref.AttnInputs, str]]:
    q, k, v = torch.zeros(1, 2, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16)
    base = ref.AttnInputs(q, k, v)
    return [
        ("rank", base._replace(q=q[0]), "4-D"),
        ("dtype", base._replace(q=q.double(), k=k.double(), v=v.double()), "not supported"),
        ("mixed dtype", base._replace(k=k.half()), "dtypes differ"),
        ("head dim", base._replace(k=torch.zeros(1, 1, 4, 8)), "head dims"),
        ("too wide", base._replace(q=torch.zeros(1, 2, 4, 512), k=torch.zeros(1, 1, 4, 512)), "exceed"),
        ("heads", ref.AttnInputs(torch.zeros(1, 3, 4, 16), q, q), "multiple"),
        ("mask", base._replace(mask=torch.ones(3, 4, dtype=torch.bool)), "broadcast"),
        ("rope rows", base._replace(cos=torch.ones(5, 16), sin=torch.zeros(5, 16)), "RoPE cos shape"),
        ("rope width", base._replace(cos=torch.ones(4, 8), sin=torch.zeros(4, 8)), "rotary_dim"),
        ("rope one", base._replace(cos=torch.ones(4, 16)), "both cos and sin"),
        (
            "rope promotes",
            base._replace(
                q=q.bfloat16(), k=k.bfloat16(), v=v.bfloat16(), cos=torch.ones(4, 16), sin=torch.zeros(4, 16)
            ),
            "promote",
        ),
    ]


@pytest.mark.parametrize(("inputs", "match"), [c[1:] for c in _bad_arguments()], ids=[c[0] for c in _bad_arguments()])
def test_invalid_arguments_raise_value_error(inputs: ref.AttnInputs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attention_forward_triton(inputs, ref.AttnFlags(scale=0.25, rope_layout=ref.ROPE_ROTATE_HALF, rotary_dim=16))


def test_rope_table_that_fits_only_q_raises() -> None:
    """Nq != Nk: one [N, r] table cannot index both q rows [0, Nq) and key rows [0, Nk) (reference.rope_qk fails)."""
    inputs, flags = _make_inputs(17, 20, 16, 1, torch.float32)
    cos, sin = _rope_table(17, 16, torch.float32)
    with pytest.raises(ValueError, match="broadcast to k"):
        attention_forward_triton(inputs._replace(cos=cos, sin=sin), flags._replace(rope_layout=0, rotary_dim=16))


def _rope_table(n: int, rotary_dim: int, dtype: torch.dtype, lead: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
    """cos/sin [*lead, n, r] of the usual frequencies, each frequency repeated in the pairing of neither layout."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    # Distinct angles on every feature (not just per pair) so a wrong partner or cos column shows in the error.
    angles = torch.cat((angles, angles * 1.37 + 0.3), dim=-1)
    shape = (*lead, n, rotary_dim)
    return angles.cos().reshape(shape).to(dtype), angles.sin().reshape(shape).to(dtype)


ROPE_CASES = {  # name: (layout, rotary_dim, head_dim, cos lead dims, causal, group)
    "half_full": (ref.ROPE_ROTATE_HALF, 16, 16, (), True, 2),
    "inter_full_4d": (ref.ROPE_INTERLEAVED, 16, 16, (1, 1), False, 1),
    "half_partial": (ref.ROPE_ROTATE_HALF, 8, 16, (1, 1), False, 2),
    "inter_partial": (ref.ROPE_INTERLEAVED, 16, 40, (), True, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_golden(case: str, dtype: torch.dtype) -> None:
    layout, rotary_dim, head_dim, lead, causal, group = ROPE_CASES[case]
    inputs, flags = _make_inputs(20, 20, head_dim, group, dtype)
    cos, sin = _rope_table(20, rotary_dim, dtype, lead)
    inputs = inputs._replace(cos=cos, sin=sin)
    flags = flags._replace(causal=causal, rope_layout=layout, rotary_dim=rotary_dim)
    out, _ = _check_against_golden(inputs, flags)
    # The rotation must matter at this tolerance: without it the output is far off.
    plain = ref.attention_forward(_as_fp64(inputs._replace(cos=None, sin=None)), flags)
    golden = ref.attention_forward(_as_fp64(inputs), flags)
    assert (plain - golden).abs().max().item() > 20 * (out.double() - golden).abs().max().item()


@pytest.mark.parametrize("layout", [ref.ROPE_ROTATE_HALF, ref.ROPE_INTERLEAVED])
def test_rope_several_blocks_batch_table(layout: int) -> None:
    """16-wide tiles (cos/sin rows follow each key block) and a per-batch [B, 1, N, r] table."""
    inputs, flags = _make_inputs(40, 40, 16, 2, torch.float32, "causal_top_left")
    cos, sin = _rope_table(40, 8, torch.float32, (1, 1))
    cos, sin = torch.cat((cos, cos.flip(2))), torch.cat((sin, -sin))
    inputs = inputs._replace(cos=cos, sin=sin)
    flags = flags._replace(rope_layout=layout, rotary_dim=8)
    out, _ = attention_forward_triton(inputs, flags, block_m=16, block_n=16)
    golden = ref.attention_forward(_as_fp64(inputs), flags)
    err_eager = (ref.attention_forward(inputs, flags).double() - golden).abs().max().item()
    assert (out.double() - golden).abs().max().item() <= 2 * err_eager + 4 * torch.finfo(torch.float32).eps


def test_rope_layout_none_ignores_the_table() -> None:
    """reference.rope_qk skips RoPE when the layout is ROPE_NONE, even with cos/sin given."""
    inputs, flags = _make_inputs(17, 17, 16, 1, torch.float32)
    cos, sin = _rope_table(17, 16, torch.float32)
    out, _ = attention_forward_triton(inputs._replace(cos=cos, sin=sin), flags)
    assert torch.equal(out, attention_forward_triton(inputs, flags)[0])


_COMPILE_SM90 = textwrap.dedent(
    """
    import json, triton
    from triton.backends.compiler import GPUTarget
    from tilefuse.codegen.attention_fwd import attention_fwd_kernel as fn
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", Lse="*fp32", Mask="*u8", Alibi="*fp32",
               BlockIdx="*i32", BlockCount="*i32")
    sig.update(qk_scale="fp32", softcap_log2="fp32")
    consts = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128, CAUSAL=True, USE_WINDOW=True, MASK_KIND=1,
                  HAS_SOFTCAP=True, HAS_ALIBI=True, INPUT_PRECISION="tf32", UPCAST_DOT=False,
                  ROPE_LAYOUT=-1, HAS_DROPOUT=False, SKIP_TILES=True, SCALE_IN_EXP=False)
    sig.update({name: "constexpr" for name in consts})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    print(json.dumps({"asm": sorted(kernel.asm), "wgmma": "wgmma" in kernel.asm["ptx"],
                      "shared": kernel.metadata.shared}))
    """
)


def test_compiles_for_hopper_without_gpu() -> None:
    """sm_90 compile in a child process: the interpreter replaces @triton.jit functions in this one."""
    report = compile_in_child(_COMPILE_SM90)
    assert {"ttgir", "ptx", "cubin"} <= set(report["asm"])
    assert report["wgmma"], "the two tl.dot products should lower to Hopper wgmma"
    assert report["shared"] <= 228 * 1024
