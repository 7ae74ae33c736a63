"""Kernel source emission: constexprs baked in and their branches folded, files named by content hash, dumping."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import ast
import hashlib
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import triton
import triton.language as tl

from tilefuse.codegen import emit
from tilefuse.codegen.attention_fwd import attention_fwd_kernel
from tilefuse.codegen.rope_kernels import rope_kernel

FWD_FLAGS = dict(
    BLOCK_M=64, BLOCK_N=32, BLOCK_D=128, BLOCK_DV=128, CAUSAL=True, USE_WINDOW=False, MASK_KIND=1,
    HAS_SOFTCAP=False, HAS_ALIBI=False, INPUT_PRECISION="tf32", UPCAST_DOT=False, ROPE_LAYOUT=-1,
)  # fmt: skip


@triton.jit
def _branchy_kernel(X, Y, n, MODE: tl.constexpr, SCALE: tl.constexpr, FLAG: tl.constexpr, DTYPE: tl.constexpr):
    offs = tl.arange(0, 16)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    if MODE == 0:
        # mode 0 doubles
        x = x * 2.0
    elif MODE == 1:
        x = x + 1.0
    else:
        x = -x
    if FLAG:
        x = x * SCALE
    x = x if not FLAG else x + 0.5
    tl.store(Y + offs, x.to(DTYPE), mask=offs < n)


@triton.jit
def _runtime_chain_kernel(X, Y, n, A: tl.constexpr, B: tl.constexpr):
    offs = tl.arange(0, 16)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    for step in range(0, 2):
        if step == 0:  # decided at run time: stays; the constexpr tests after it fold
            x = x * 2.0
        elif A:
            x = x + 1.0
        elif B:
            x = x - 3.0
        else:
            x = -x
    tl.store(Y + offs, x, mask=offs < n)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEFUSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TILEFUSE_DUMP_KERNELS", raising=False)
    monkeypatch.setattr(emit, "_memo", {})
    monkeypatch.setattr(emit, "_dump_dir", None)
    monkeypatch.setattr(emit, "_launch_memo", {})


def test_specialized_attention_source_has_no_baked_names_and_no_dead_branches() -> None:
    source = emit.specialize(attention_fwd_kernel, FWD_FLAGS).source
    ast.parse(source)
    header = source[source.index("def attention_fwd_kernel(") : source.index("):")]
    for name in FWD_FLAGS:
        assert name not in header
    body = source[source.index("):") :]
    folded = ("CAUSAL", "MASK_KIND", "HAS_SOFTCAP", "HAS_ALIBI", "ROPE_LAYOUT", "USE_WINDOW", "rope_tile", "tile_tanh")
    for name in folded:
        assert name not in body, name  # decided branches are folded; RoPE/softcap helpers are not even imported
    assert "keep &= offs_n[None, :] <= q_pos[:, None]" in body  # causal kept
    assert "tl.load(mask_ptrs, mask=in_range, other=0) != 0" in body  # boolean mask kept, additive dropped
    assert "Scores live in log2 units" in body  # comments survive


def test_elif_else_and_conditional_expressions_fold() -> None:
    sources = {
        mode: emit.specialize(_branchy_kernel, dict(MODE=mode, SCALE=3.0, FLAG=False)).source for mode in (0, 1, 2)
    }
    assert "x * 2.0" in sources[0] and "# mode 0 doubles" in sources[0] and "x + 1.0" not in sources[0]
    assert "x + 1.0" in sources[1] and "x * 2.0" not in sources[1] and "-x" not in sources[1]
    assert "x = -x" in sources[2] and "elif" not in sources[2]
    for source in sources.values():
        assert "if" not in source.split("):", 1)[1]  # every branch here is decided by baked values
        assert "x * SCALE" not in source and "x + 0.5" not in source
        assert "DTYPE: tl.constexpr" in source  # not given: stays a constexpr parameter


@pytest.mark.parametrize("a,b", [(False, False), (False, True), (True, False), (True, True)])
def test_static_elif_after_a_runtime_if_folds_inside_the_chain(a: bool, b: bool) -> None:
    """`if <runtime>: .. elif CONST: .. else: ..` keeps the else branch under the runtime test."""
    source = emit.specialize(_runtime_chain_kernel, dict(A=a, B=b)).source
    ast.parse(source)
    kept = "x = x + 1.0" if a else "x = x - 3.0" if b else "x = -x"
    assert "if step == 0:" in source and "elif" not in source and f"else:\n            {kept}\n" in source
    x = torch.randn(13, generator=torch.Generator().manual_seed(1))
    want, got = torch.empty(13), torch.empty(13)
    _runtime_chain_kernel[(1,)](x, want, 13, A=a, B=b)
    emit.launch(_runtime_chain_kernel, (1,), x, got, 13, A=a, B=b)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode,flag", [(0, False), (1, True), (2, True)])
def test_emitted_kernel_computes_what_the_generic_one_does(mode: int, flag: bool) -> None:
    x = torch.randn(13, generator=torch.Generator().manual_seed(0))
    want, got = torch.empty(13), torch.empty(13)
    _branchy_kernel[(1,)](x, want, 13, MODE=mode, SCALE=3.0, FLAG=flag, DTYPE=tl.float32)
    emit.launch(_branchy_kernel, (1,), x, got, 13, MODE=mode, SCALE=3.0, FLAG=flag, DTYPE=tl.float32)
    assert torch.equal(got, want)


def test_files_are_named_by_content_hash_and_memoized() -> None:
    first = emit.specialize(_branchy_kernel, dict(MODE=0, SCALE=1.0, FLAG=True))
    again = emit.specialize(_branchy_kernel, dict(FLAG=True, MODE=0, SCALE=1.0))
    other = emit.specialize(_branchy_kernel, dict(MODE=1, SCALE=1.0, FLAG=True))
    assert again is first and other.digest != first.digest
    assert first.path.parent == emit.cache_dir() and first.digest[:20] in first.path.name
    text = first.path.read_text()
    assert text == first.source
    assert hashlib.sha256(f"{triton.__version__}\n{text}".encode()).hexdigest() == first.digest


def test_a_tampered_cache_file_is_rewritten(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    first = emit.specialize(_branchy_kernel, dict(MODE=2, SCALE=1.0, FLAG=False))
    first.path.write_text(first.source.replace("x = -x", "x = x"))
    monkeypatch.setattr(emit, "_memo", {})
    with caplog.at_level(logging.WARNING, logger="tilefuse.codegen"):
        second = emit.specialize(_branchy_kernel, dict(MODE=2, SCALE=1.0, FLAG=False))
    assert "does not match its hash" in caplog.text
    assert second.path.read_text() == first.source


def test_dump_dir_receives_emitted_and_later_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    early = emit.specialize(_branchy_kernel, dict(MODE=0, SCALE=2.0, FLAG=True))
    emit.set_dump_dir(tmp_path / "dump")
    late = emit.specialize(rope_kernel, dict(BLOCK_ROWS=16, BLOCK_HALF=8, BLOCK_TAIL=1, LAYOUT=0, BACKWARD=False,
                                              HAS_TAIL=False))  # fmt: skip
    dumped = {p.name for p in (tmp_path / "dump").iterdir()}
    assert {early.path.name, late.path.name} <= dumped
    emit.set_dump_dir(None)
    monkeypatch.setenv("TILEFUSE_DUMP_KERNELS", str(tmp_path / "env"))
    emit.specialize(_branchy_kernel, dict(MODE=1, SCALE=2.0, FLAG=True))
    assert len(list((tmp_path / "env").iterdir())) == 1


def test_unknown_constexpr_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no constexpr parameter"):
        emit.specialize(_branchy_kernel, dict(MODE=0, BLOCK=16))


def test_repeated_launches_reuse_the_emitted_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []
    real = emit.specialize

    def counting(kernel: object, constexprs: dict[str, object]) -> emit.EmittedKernel:
        calls.append(constexprs)
        return real(kernel, constexprs)

    monkeypatch.setattr(emit, "specialize", counting)
    x, y = torch.randn(8), torch.empty(8)
    for mode in (0, 0, 1, 0):
        emit.launch(_branchy_kernel, (1,), x, y, 8, MODE=mode, SCALE=1.0, FLAG=False, DTYPE=tl.float32)
    assert [c["MODE"] for c in calls] == [0, 1]  # one specialization per distinct variant
