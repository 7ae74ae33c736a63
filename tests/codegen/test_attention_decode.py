"""Numerics of the split-KV decode attention under the interpreter against an fp64 golden, its split layout,
dispatch, and its sm_90 compile."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import textwrap

import pytest
import torch
from _sm90 import compile_in_child
from torch import Tensor

pytest.importorskip("triton", reason="triton is not installed; the Triton attention kernels cannot run")

from tilefuse.codegen import attention_decode as decode
from tilefuse.codegen import reference as ref
from tilefuse.codegen.attention_decode import attention_decode_triton, split_layout, use_decode
from tilefuse.codegen.attention_fwd import attention_forward_triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")


def _make_inputs(
    nq: int, nk: int, head_dim: int, group: int, dtype: torch.dtype, variant: str = "plain"
) -> tuple[ref.AttnInputs, ref.AttnFlags]:
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads = 2, 2
    q_heads = kv_heads * group

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = (rand(batch, h, n, head_dim) for h, n in ((q_heads, nq), (kv_heads, nk), (kv_heads, nk)))
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(scale=head_dim**-0.5)
    if variant == "causal_top_left":
        flags = flags._replace(causal=True)
    elif variant == "causal_bottom_right":
        flags = flags._replace(causal=True, bottom_right=True)
    elif variant == "window":  # window without causal: keys after the query stay visible
        flags = flags._replace(window=30, bottom_right=True)
    elif variant == "key_padding":
        mask = torch.rand(batch, 1, 1, nk, generator=gen) > 0.3
        mask[1] = False  # batch 1: every row fully masked
        inputs = inputs._replace(mask=mask)
    elif variant == "additive":
        mask = torch.randn(1, q_heads, nq, nk, generator=gen).to(dtype)
        mask[..., 0, :] = float("-inf")  # one fully masked row through the additive path
        inputs = inputs._replace(mask=mask)
    elif variant == "softcap":
        flags = flags._replace(softcap=0.7)
    elif variant == "alibi":
        inputs = inputs._replace(alibi_slopes=torch.rand(batch, q_heads, generator=gen))
        flags = flags._replace(causal=True, bottom_right=True)
    return inputs, flags


def _as_fp64(inputs: ref.AttnInputs) -> ref.AttnInputs:
    return ref.AttnInputs(*(t.double() if t is not None and t.is_floating_point() else t for t in inputs))


def _check_against_golden(inputs: ref.AttnInputs, flags: ref.AttnFlags, **knobs: int) -> tuple[Tensor, Tensor]:
    """ours within 2x the eager same-dtype error of the fp64 golden, plus a rounding floor; finite."""
    out, lse = attention_decode_triton(inputs, flags, **knobs)
    golden = ref.attention_forward(_as_fp64(inputs), flags)
    eager = ref.attention_forward(inputs, flags)
    floor = 4 * torch.finfo(inputs.q.dtype).eps
    err_ours = (out.double() - golden).abs().max().item()
    err_eager = (eager.double() - golden).abs().max().item()
    assert out.dtype == inputs.q.dtype and out.shape == golden.shape
    assert lse.dtype == torch.float32 and lse.shape == golden.shape[:3]
    assert torch.isfinite(out).all() and not torch.isnan(lse).any() and not torch.isposinf(lse).any()
    assert err_ours <= 2 * err_eager + floor, f"ours {err_ours:.3g} vs eager {err_eager:.3g}"
    return out, lse


# (Nq, Nk, group, head_dim, dtype, variant, num_splits): None = the launcher's heuristic (with its default
# 64-key blocks); otherwise 16-key blocks.
CASES = [
    (1, 17, 1, 40, torch.float32, "plain", None),
    (1, 255, 4, 64, torch.bfloat16, "plain", None),
    (4, 113, 2, 128, torch.float32, "plain", 3),
    (1, 50, 2, 40, torch.float32, "plain", 8),  # 4 key blocks, 8 splits: half of them empty
    (4, 113, 2, 40, torch.bfloat16, "causal_bottom_right", 2),
    (4, 50, 2, 40, torch.float16, "causal_bottom_right", 5),
    (4, 17, 2, 40, torch.float32, "causal_top_left", 4),  # rows see keys 0..3: one block, three empty splits
    (1, 255, 2, 64, torch.float32, "window", 5),  # splits cut the window's blocks only
    (4, 50, 4, 40, torch.float32, "key_padding", 3),
    (4, 17, 2, 40, torch.bfloat16, "additive", 1),
    (1, 113, 2, 64, torch.bfloat16, "softcap", 4),
    (4, 113, 1, 40, torch.float32, "alibi", 3),
]


@pytest.mark.parametrize(("nq", "nk", "group", "head_dim", "dtype", "variant", "splits"), CASES, ids=str)
def test_decode_matches_golden(
    nq: int, nk: int, group: int, head_dim: int, dtype: torch.dtype, variant: str, splits: int | None
) -> None:
    inputs, flags = _make_inputs(nq, nk, head_dim, group, dtype, variant)
    knobs = {} if splits is None else {"block_n": 16, "num_splits": splits}
    _check_against_golden(inputs, flags, **knobs)


def _golden_lse(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> Tensor:
    """logsumexp over the fp64 masked scores (no softcap/ALiBi/RoPE in the cases that use it)."""
    q, k = inputs.q.double(), inputs.k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * flags.scale
    keep = ref.keep_mask(q.shape[2], k.shape[2], flags.causal, flags.bottom_right, flags.window, q.device)
    mask = inputs.mask
    if mask is not None and mask.dtype != torch.bool:
        scores, mask = scores + mask.double(), None
    if mask is not None:
        keep = mask if keep is None else keep & mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("variant", ["causal_bottom_right", "key_padding", "additive", "window"])
def test_lse_and_fully_masked_rows(variant: str) -> None:
    """lse is the natural-log logsumexp of the golden scores; fully masked rows give output 0 and lse -inf
    (Nq > Nk bottom-right leaves the first rows with no key)."""
    nq, nk = (4, 2) if variant == "causal_bottom_right" else (4, 40)
    inputs, flags = _make_inputs(nq, nk, 16, 2, torch.float32, variant)
    out, lse = _check_against_golden(inputs, flags, block_n=16, num_splits=2)
    golden = _golden_lse(inputs, flags)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(golden))
    finite = torch.isfinite(golden)
    torch.testing.assert_close(lse[finite].double(), golden[finite], rtol=1e-5, atol=1e-5)
    if variant != "window":
        assert torch.isneginf(lse).any(), "the case must contain fully masked rows"
        assert (out[torch.isneginf(lse)] == 0).all()


ROPE_CASES = {  # name: (layout, rotary_dim, head_dim, group, table shape prefix, dtype)
    "half_full_bf16": (ref.ROPE_ROTATE_HALF, 64, 64, 2, (1,), torch.bfloat16),
    "inter_partial_per_head": (ref.ROPE_INTERLEAVED, 16, 40, 1, (2, 2, 1), torch.float32),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_golden(case: str) -> None:
    """One rotation per (batch, head) shared by q and k rows: reference.rope_qk applies one table to both, so with
    Nq != Nk the table's sequence dim must broadcast (size 1)."""
    layout, rotary_dim, head_dim, group, lead, dtype = ROPE_CASES[case]
    inputs, flags = _make_inputs(4, 50, head_dim, group, dtype, "causal_bottom_right")
    angles = torch.rand(*lead, rotary_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 6
    inputs = inputs._replace(cos=angles.cos().to(dtype), sin=angles.sin().to(dtype))
    flags = flags._replace(rope_layout=layout, rotary_dim=rotary_dim)
    out, _ = _check_against_golden(inputs, flags, block_n=16, num_splits=2)
    plain = ref.attention_forward(_as_fp64(inputs._replace(cos=None, sin=None)), flags)
    golden = ref.attention_forward(_as_fp64(inputs), flags)
    assert (plain - golden).abs().max().item() > 20 * (out.double() - golden).abs().max().item()


def test_dropout_matches_reference_draw() -> None:
    """The keep mask is drawn per (b, h, i, j) counter exactly as reference.dropout_keep, whatever the split."""
    inputs, flags = _make_inputs(4, 50, 16, 2, torch.float32, "causal_bottom_right")
    inputs, flags = inputs._replace(rng=torch.tensor([123, 45])), flags._replace(dropout_p=0.25)
    _check_against_golden(inputs, flags, block_n=16, num_splits=3)


def test_matches_forward_kernel() -> None:
    inputs, flags = _make_inputs(4, 50, 40, 2, torch.float32, "key_padding")
    flags = flags._replace(causal=True, bottom_right=True)
    out, lse = attention_decode_triton(inputs, flags, block_n=16, num_splits=3)
    out_fwd, lse_fwd = attention_forward_triton(inputs, flags)
    torch.testing.assert_close(out, out_fwd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_fwd, rtol=1e-5, atol=1e-5)


def test_split_layout_cuts_the_visible_range() -> None:
    flags = ref.AttnFlags(scale=1.0)
    assert split_layout(1, 4096, 64, flags, 32) == (0, 4096, 512, 9, 8)  # ceil(264/32) = 9 splits, 8 with work
    assert split_layout(1, 4096, 64, flags, 512).num_splits == 1  # a full GPU needs no split
    assert split_layout(4, 17, 16, flags._replace(causal=True), 1, 4) == (0, 4, 16, 4, 1)
    window = flags._replace(window=100, bottom_right=True)
    assert split_layout(1, 1000, 16, window, 1, 2) == (896, 1000, 64, 2, 2)  # (999 - 100 + 1) // 16 * 16
    empty = flags._replace(causal=True, bottom_right=True)
    assert split_layout(8, 0, 16, empty, 1).work_splits == 0


def test_use_decode_picks_few_rows_over_long_kv() -> None:
    assert use_decode(1, 4096, 8) and use_decode(16, 256, 8)
    assert not use_decode(1, 255, 8) and not use_decode(17, 4096, 1) and not use_decode(16, 4096, 16)
    assert not use_decode(8, 4096, 8, head_dim=256) and use_decode(8, 4096, 8, head_dim=128)


def test_dispatch_runs_decode_for_decode_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    from tilefuse.codegen import gpu

    calls: list[tuple[int, ...]] = []
    launcher = decode.attention_decode_triton

    def spy(inputs: ref.AttnInputs, flags: ref.AttnFlags) -> tuple[Tensor, Tensor]:
        calls.append(tuple(inputs.q.shape))
        return launcher(inputs, flags)

    monkeypatch.setattr(decode, "attention_decode_triton", spy)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, n, 16, generator=gen) for h, n in ((4, 1), (1, 256), (1, 256)))
    inputs, flags = ref.AttnInputs(q, k, v), ref.AttnFlags(0.25, causal=True, bottom_right=True)
    torch.testing.assert_close(gpu.attention(inputs, flags), ref.attention_forward(inputs, flags))
    assert calls == [(1, 4, 1, 16)]
    short = inputs._replace(k=inputs.k[:, :, :40], v=inputs.v[:, :, :40])
    torch.testing.assert_close(gpu.attention(short, flags), ref.attention_forward(short, flags))
    assert len(calls) == 1  # 40 keys: the forward kernel


@pytest.mark.parametrize(
    ("knobs", "match"),
    [({"num_splits": 0}, "num_splits"), ({"block_n": 24}, "block_n"), ({"num_splits": 5000}, "num_splits")],
)
def test_invalid_knobs_raise_value_error(knobs: dict[str, int], match: str) -> None:
    inputs, flags = _make_inputs(1, 17, 16, 1, torch.float32)
    with pytest.raises(ValueError, match=match):
        attention_decode_triton(inputs, flags, **knobs)  # type: ignore[arg-type]


def test_too_many_rows_for_one_tile_raise() -> None:
    q, kv = torch.zeros(1, 16, 9, 16), torch.zeros(1, 1, 32, 16)
    with pytest.raises(ValueError, match="rows exceed"):
        attention_decode_triton(ref.AttnInputs(q, kv, kv), ref.AttnFlags(0.25))


_COMPILE_SM90 = textwrap.dedent(
    """
    import dataclasses, json
    from tilefuse.codegen.compile_check import compile_kernel, decode_variants, kernel_resources
    split, rope, combine = decode_variants()[0], decode_variants()[2], decode_variants()[-1]
    every = dict(rope.constexprs, USE_WINDOW=True, MASK_KIND=2, HAS_SOFTCAP=True, HAS_ALIBI=True, ROPE_LAYOUT=1,
                 HAS_DROPOUT=True, SKIP_TILES=True)
    pointers = {**rope.pointers, "Mask": "*bf16"}
    every = dataclasses.replace(rope, name="every_feature", constexprs=every, pointers=pointers)
    report = {}
    for variant in (split, every, combine):
        kernel = compile_kernel(variant, "sm_90")
        report[variant.name] = [*kernel_resources(kernel), sorted(kernel.asm)]
    print(json.dumps(report))
    """
)


def test_compiles_for_hopper_without_gpu() -> None:
    """Both phases, and phase 1 with every feature on, compile for sm_90 without spilling."""
    report = compile_in_child(_COMPILE_SM90)
    assert len(report) == 3
    for name, (registers, spill, shared, asm) in report.items():
        assert {"ttgir", "ptx", "cubin"} <= set(asm), name
        assert 0 < registers <= 255 and spill == 0 and shared <= 228 * 1024, (name, registers, spill, shared)
