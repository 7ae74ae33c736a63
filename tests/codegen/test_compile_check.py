"""`tilefuse compile-check`: every kernel family compiles for sm_90 and sm_80 on this CPU, and default configs
do not spill."""

from __future__ import annotations

import dataclasses
import textwrap

from _sm90 import compile_in_child

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


def test_unknown_arch_is_a_usage_error() -> None:
    assert main(["compile-check", "--arch", "sm_99"]) == 2
