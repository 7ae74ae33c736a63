"""`tilefuse compile-check`: every kernel family compiles for sm_90 and sm_80 on this CPU, and default configs
do not spill."""

from __future__ import annotations

import dataclasses
import textwrap

from _sm90 import compile_in_child

from tilefuse.codegen import kernel_variant
from tilefuse.codegen.kernel_variant import KernelVariant
from tilefuse.compiler.cli import main

_SCRIPT = textwrap.dedent(
    """
    import json
    from tilefuse.codegen.compile_check import compile_check
    print(json.dumps({arch: [r.to_dict() for r in compile_check(arch)] for arch in ("sm_90", "sm_80")}))
    """
)


# Largest shared memory one block may opt into: H100 227 KiB, A100 163 KiB (CUDA programming guide, table 21).
SHARED_LIMIT_BYTES = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


def test_every_kernel_compiles_without_spills() -> None:
    report = compile_in_child(_SCRIPT)
    for arch, results in report.items():
        names = {r["name"] for r in results}
        assert {"attention_fwd_d128", "rms_norm_bwd", "layer_norm_fwd", "rope_interleaved"} <= names
        for r in results:
            assert r["ok"], (arch, r)
            assert r["spill_bytes"] == 0, (arch, r)
            assert 0 < r["registers"] <= 255, (arch, r)
            assert r["shared_bytes"] <= SHARED_LIMIT_BYTES[arch], (arch, r)  # Triton only refuses it at launch
        by_name = {r["name"]: r for r in results}
        # The attention forward's two tile loops: the one without mask code is the shorter; with a data mask, the
        # listed full tiles run a clean loop too, and only the other loop loads the mask.
        for name in ("attention_fwd_d128", "attention_fwd_d128_mask"):
            clean, masked = by_name[name]["loop_instructions"]
            assert 0 < clean < masked, (arch, name, clean, masked)
            assert [loop["kind"] for loop in by_name[name]["loops"]] == ["clean", "masked"], (arch, name)
        for r in results:  # the mix covers the loops loop_instructions lists, and every tile loop is tensor-core work
            assert [loop["instructions"] for loop in r["loops"]] == list(r["loop_instructions"]), (arch, r["name"])
            assert r["config"] is not None, (arch, r["name"])
            for loop in r["loops"]:
                assert (loop["flops"] > 0) == (loop["kind"] in ("clean", "masked", "tile")), (arch, r["name"], loop)
                assert loop["flops"] == 0 or loop["hgmma"] + loop["hmma"] > 0, (arch, r["name"], loop)


def test_the_default_kernels_come_from_the_family_records() -> None:
    """Compile-check derives no constexpr itself: each kernel is a record's variant for a representative Spec, with
    the launch-like ints a launch passes (a mask tensor's block-list strides included)."""
    from tilefuse.codegen.compile_check import default_variants, representatives
    from tilefuse.codegen.families import FAMILIES

    entries, variants = representatives(), default_variants()
    assert len({entry.name for entry in entries}) == len(variants) == 45
    for entry, variant in zip(entries, variants, strict=True):
        built = FAMILIES[entry.family].checked_variants(entry.spec, entry.config)[entry.kernel]
        assert variant == dataclasses.replace(built, name=entry.name)
        assert variant.ints, entry.name
        masked = variant.constexprs.get("MASK_KIND", 0) != 0
        assert masked == ("stride_ib" in variant.ints), entry.name


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x1, PT ;
        /*0020*/                   FADD R2, R2, R3 ;
        /*0030*/                   FMUL R2, R2, R4 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FFMA R5, R2, R2, R5 ;
        /*0060*/                   BRA 0x50 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x90 ;
"""


def test_loop_instructions_counts_each_backward_branch_body() -> None:
    from tilefuse.codegen.compile_check import loop_instructions

    assert loop_instructions(SASS) == (3, 2)  # 0x20-0x40 and 0x50-0x60; the forward branch at 0x80 is no loop


# An outer loop (0x10-0x120) around a clean and a masked tile loop, as the attention backward's dK/dV compiles.
MIX_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0030*/                   LDGDEPBAR ;
        /*0040*/                   DEPBAR.LE SB0, 0x0 ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   WARPGROUP.ARRIVE ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0090*/                   MUFU.EX2 R5, R5 ;
        /*00a0*/               @P0 BRA 0x20 ;
        /*00b0*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*00c0*/                   FSEL R5, R5, -INF , P1 ;
        /*00d0*/              @!P1 MUFU.RCP R6, R6 ;
        /*00e0*/                   UTMALDG.2D [UR4], [UR6] ;
        /*00f0*/                   SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR4], RZ ;
        /*0100*/                   BSYNC B0 ;
        /*0110*/               @P2 BRA 0xb0 ;
        /*0120*/               @P3 BRA 0x10 ;
        /*0130*/                   EXIT ;
"""


def _mix_variant(**constexprs: object) -> KernelVariant:
    blocks = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 128, "BLOCK_DV": 64, "MASK_KIND": 0, "SKIP_TILES": False}
    return KernelVariant("dkdv", kernel_variant.attention_bwd_dkdv_kernel, {}, (), blocks | constexprs, num_warps=4)


def test_loop_mix_counts_opcode_classes_per_loop() -> None:
    from tilefuse.codegen.compile_check import LoopMix, loop_instructions, loop_mix

    clean, masked, outer = loop_mix(MIX_SASS, _mix_variant())
    flops = 2 * 64 * 32 * (2 * 128 + 2 * 64)  # QKᵀ, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q of one 64x32 tile
    # barriers: DEPBAR, BAR, the two WARPGROUP ops; not LDGDEPBAR (a commit)
    assert clean == LoopMix("clean", 9, hgmma=1, hmma=0, mufu=1, tma=0, cp_async=1, barriers=4, flops=flops,
                            density=9 * 4 / (flops / 1e6))  # fmt: skip
    # SYNCS counts, BSYNC (reconvergence) does not; a predicated MUFU counts
    assert masked == LoopMix("masked", 7, hgmma=0, hmma=1, mufu=1, tma=1, cp_async=0, barriers=1, flops=flops,
                             density=7 * 4 / (flops / 1e6))  # fmt: skip
    assert (outer.kind, outer.flops, outer.density, outer.hgmma, outer.hmma) == ("outer", 0, None, 1, 1)
    assert [loop.instructions for loop in (clean, masked, outer)] == list(loop_instructions(MIX_SASS))


def test_loop_kinds_follow_the_compiled_phases() -> None:
    from tilefuse.codegen.compile_check import loop_mix

    # a data mask without a block list compiles the masked phase only
    variant = dataclasses.replace(_mix_variant(MASK_KIND=1), kernel=kernel_variant.attention_fwd_kernel)
    single = "\n".join(line for line in MIX_SASS.splitlines() if "0x20 ;" not in line)
    assert [loop.kind for loop in loop_mix(single, variant)] == ["masked", "outer"]
    assert loop_mix(single, variant)[0].flops == 2 * 64 * 32 * (128 + 64)
    norm = dataclasses.replace(variant, kernel=kernel_variant.norm_bwd_chunked_kernel, constexprs={})
    assert [(loop.kind, loop.flops, loop.density) for loop in loop_mix(MIX_SASS, norm)] == [
        ("chunks", 0, None), ("chunks", 0, None), ("outer", 0, None)]  # fmt: skip


_MIX_SCRIPT = textwrap.dedent(
    """
    import json
    from tilefuse.codegen.compile_check import compile_variant, representative_variant, representatives
    entries = [e for e in representatives() if e.name in ("attention_fwd_d64", "rms_norm_bwd")]
    print(json.dumps([compile_variant(representative_variant(e), "sm_90", e).to_dict() for e in entries]))
    """
)


def test_the_sm90_forward_loops_run_on_wgmma() -> None:
    """The FA2 forward at D=64 compiles its K/V tile loops to HGMMA on sm_90; a norm loop has no tensor-core work."""
    forward, norm = compile_in_child(_MIX_SCRIPT)
    assert forward["config"] == {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
    assert forward["head_dim"] == 64
    assert [loop["kind"] for loop in forward["loops"]] == ["clean", "masked"]
    for loop in forward["loops"]:
        assert loop["hgmma"] > 0 and loop["hmma"] == 0 and loop["mufu"] > 0, loop
        assert loop["flops"] == 2 * 128 * 64 * (64 + 64)
        assert loop["density"] == loop["instructions"] * 8 / (loop["flops"] / 1e6)
    assert norm["head_dim"] is None and norm["loops"]
    assert all(loop["flops"] == 0 and loop["density"] is None for loop in norm["loops"]), norm["loops"]


def test_unknown_arch_is_a_usage_error() -> None:
    assert main(["compile-check", "--arch", "sm_99"]) == 2
