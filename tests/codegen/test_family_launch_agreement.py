"""The two derivations of a launch's constexprs and integer arguments agree: the launchers derive them from tensors
(codegen/attention_fwd.py, ...), the kernel-family records from a Spec (`KernelFamily.variants`, what compile-check
and the cost model compile without a GPU). Every family's real launcher runs under the interpreter on the tensors the
cost-model cases build for a Spec, and each launch's arguments are compared with the record's variant."""

from __future__ import annotations

from typing import Any

import pytest

from tilefuse.codegen import emit
from tilefuse.codegen.families import FAMILIES, default_config
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.costmodel.cases import kernel_case
from tilefuse.specs import AttentionSpec, NormSpec, RopeSpec, Spec

B, H, N, D = 1, 2, 32, 16
_KEY_PADDING = dict(mask="key_padding", mask_shape=(B, 1, 1, N))
CASES: dict[str, tuple[str, Spec]] = {
    "fwd_causal": ("attention", AttentionSpec(B, H, H, N, N, D, D, "float16", 0.25, True)),
    "fwd_key_padding": ("attention", AttentionSpec(B, H, H, N, N, D, D, "float16", 0.25, False, **_KEY_PADDING)),
    "fwd_additive_window": ("attention", AttentionSpec(B, H, H, N, N, D, D, "float32", 0.25, True, window=8,
                                                        mask="additive", mask_shape=(B, 1, N, N))),
    "fwd_softcap_alibi": ("attention", AttentionSpec(B, H, H, N, N, D, D, "float16", 0.25, True, softcap=20.0,
                                                      alibi=True)),
    "fwd_rope": ("attention", AttentionSpec(B, H, H, N, N, D, D, "float16", 0.25, True,
                                            rope=RopeSpec("rotate_half", D, D, ()))),
    "decode_gqa": ("attention_decode", AttentionSpec(2, 4, 2, 1, 64, D, D, "float16", 0.25, True, "bottom_right",
                                                     gqa_group=2)),
    "decode_key_padding": ("attention_decode", AttentionSpec(2, 4, 2, 1, 64, D, D, "float16", 0.25, False,
                                                             gqa_group=2, mask="key_padding",
                                                             mask_shape=(2, 1, 1, 64))),
    "backward_causal": ("attention_backward", AttentionSpec(B, H, H, N, N, D, D, "float32", 0.25, True)),
    "backward_key_padding": ("attention_backward", AttentionSpec(B, H, H, N, N, D, D, "float32", 0.25, True,
                                                                 **_KEY_PADDING)),
    "rmsnorm": ("norm", NormSpec("rmsnorm", 64, (8, 64), "float16", 1e-6, out_dtype="float16")),
    "layernorm_residual": ("norm", NormSpec("layernorm", 64, (8, 64), "float32", 1e-5, has_bias=True, residual=True,
                                            out_dtype="float32")),
    "rmsnorm_chunked": ("norm", NormSpec("rmsnorm", 256, (4, 256), "float32", 1e-6, out_dtype="float32")),
    "norm_backward": ("norm_backward", NormSpec("layernorm", 64, (8, 64), "float32", 1e-5, out_dtype="float32")),
    "rope_rotate_half": ("rope", RopeSpec("rotate_half", 32, 32, (1, 2, 16, 32), "float16")),
    "rope_interleaved_partial": ("rope", RopeSpec("interleaved", 16, 32, (1, 2, 16, 32), "float32")),
}  # fmt: skip
CONFIGS = {
    "rmsnorm_chunked": TileConfig(block_n=64, num_warps=2),  # a row wider than its block: the chunked kernels
    "norm_backward": TileConfig(block_n=64, num_warps=2, num_splits=4),  # its default program count is per device
}


def _launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """Every emit.launch from now on, as (kernel, its arguments by parameter name + launch options)."""
    seen: list[tuple[Any, dict[str, Any]]] = []
    real = emit.launch

    def recording(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((kernel, dict(zip(kernel.arg_names, args, strict=False)) | kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(emit, "launch", recording)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_record_variants_match_the_launch(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    family, spec = CASES[case]
    config = CONFIGS.get(case, default_config(spec, family))
    runner = kernel_case(spec, family, "cpu")
    launches = _launches(monkeypatch)
    outputs = runner.launch(config)
    assert runner.mismatch(outputs) is None
    variants = FAMILIES[family].checked_variants(spec, config)
    assert variants
    for variant in variants:
        kernel = variant.kernel()
        mine = [args for launched, args in launches if launched is kernel]
        assert mine, f"{variant.name}: the launcher never launched {kernel.fn.__name__}"
        args = mine[-1]
        params = set(kernel.arg_names)  # a record's ints may name more than this kernel takes; a compile ignores them
        assert set(variant.constexprs) <= params, f"{variant.name}: constexprs the kernel lacks"
        ints = {k: v for k, v in (variant.ints or {}).items() if k in params}
        expected = {**variant.constexprs, **ints, "num_warps": variant.num_warps}
        if "num_stages" in args:
            expected["num_stages"] = variant.num_stages
        differ = {k: (v, args.get(k, "<not passed>")) for k, v in expected.items() if args.get(k, "<not passed>") != v}
        assert not differ, f"{variant.name}: record vs launch {differ}"
