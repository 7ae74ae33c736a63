"""Collection for every kernel family on CPU: each family's tiny grid measured under the Triton interpreter through
the same cases the GPU measurement uses (`costmodel.cases`), resumable, with the family in every record; records of
version 1 (attention forward, no family) still read; the output check and the CUDA guard."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tilefuse.codegen.families import KERNEL_FAMILIES
from tilefuse.codegen.tile_config import TileConfig
from tilefuse.compiler.cli import main
from tilefuse.costmodel.cases import kernel_case
from tilefuse.costmodel.collect import FAMILIES, TINY_CHOICES, collect, interpreter_measure, plan_tasks, shape_grid
from tilefuse.costmodel.hardware import get_gpu
from tilefuse.costmodel.measure import Measurement, gpu_measure
from tilefuse.costmodel.records import MeasurementRecord, iter_records, make_record, write_records
from tilefuse.specs import AttentionSpec, NormSpec

H100 = get_gpu("h100")
NORM = NormSpec("rmsnorm", 64, (8, 64), "float32", 1e-6, out_dtype="float32")


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_each_family_under_the_interpreter(tmp_path: Path, family: str) -> None:
    tasks = plan_tasks(shape_grid(family, "tiny"), H100, TINY_CHOICES[family], kind=family)
    assert tasks and {t.kind for t in tasks} == {family}
    out = tmp_path / f"{family}.jsonl.gz"
    kwargs = {"gpu_name": "triton-interpreter", "interpreted": True}
    first = collect(tasks, out, interpreter_measure, H100, limit=2, **kwargs)  # type: ignore[arg-type]
    records = list(iter_records(out))
    assert first.written == len(records) == 2 and {r.family for r in records} == {family}
    assert records[0].status == "ok" and all(r.interpreted for r in records), [r.detail for r in records]
    assert all(r.status == "ok" or (r.detail or "").startswith("infeasible: rejected") for r in records)
    assert records[0].features["analytic"]["latency_us"] > 0
    again = collect(tasks, out, interpreter_measure, H100, limit=1, **kwargs)  # type: ignore[arg-type]
    assert (again.skipped, again.written) == (2, 1)
    assert len({r.key for r in iter_records(out)}) == 3


def test_collect_command_takes_a_family_or_all(tmp_path: Path) -> None:
    out = tmp_path / "rope.jsonl.gz"
    assert main(["costmodel", "collect", "--interpret", "--family", "rope", "--out", str(out), "--limit", "2"]) == 0
    assert [r.family for r in iter_records(out)] == ["rope", "rope"]
    everything = tmp_path / "all.jsonl.gz"
    args = ["--family", "all", "--out", str(everything), "--limit", "1"]
    assert main(["costmodel", "collect", "--interpret", *args]) == 0
    assert len(list(iter_records(everything))) == 1


def test_shape_grids_cover_every_family() -> None:
    for family in FAMILIES:
        small, full = shape_grid(family, "small"), shape_grid(family, "full")
        assert len(small) == 8 and len(full) >= 60 and len(set(full)) == len(full), family
    decode = shape_grid("attention_decode", "full")
    assert {s.q_len for s in decode} == {1} and {s.gqa_group for s in decode} == {1, 4, 8}  # type: ignore[union-attr]
    assert max(s.kv_len for s in decode) == 131072  # type: ignore[union-attr]
    norms = shape_grid("norm", "full")
    assert {s.width for s in norms} >= {2048, 8192, 16384} and any(s.residual for s in norms)  # type: ignore[union-attr]
    assert not any(s.residual for s in shape_grid("norm_backward", "full"))  # type: ignore[union-attr]
    ropes = shape_grid("rope", "full")
    assert {s.head_dim for s in ropes} == {64, 128} and any(s.rotary_dim < s.head_dim for s in ropes)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="family"):
        shape_grid("softmax", "tiny")


# ----------------------------------------------------------------------------------------------------- records
def _norm_record(family: str) -> MeasurementRecord:
    return make_record(NORM, TileConfig(num_warps=2, num_splits=4), "NVIDIA H100 SXM", Measurement.ok(5.0),
                       versions={}, features={}, family=family)  # fmt: skip


def test_records_carry_the_family(tmp_path: Path) -> None:
    forward, backward = _norm_record("norm"), _norm_record("norm_backward")
    assert forward.key != backward.key and forward.group != backward.group
    path = tmp_path / "r.jsonl.gz"
    write_records(path, [forward, backward])
    assert list(iter_records(path)) == [forward, backward]
    assert backward.to_dict()["family"] == "norm_backward" and backward.tile_config.num_splits == 4
    spec = AttentionSpec(1, 4, 1, 1, 512, 64, 64, "bfloat16", 0.125, gqa_group=4)
    assert make_record(spec, TileConfig(), "h", Measurement.ok(1.0), versions={}, features={}).family == (
        "attention_decode"
    )  # the default: the Spec's forward family
    with pytest.raises(ValueError, match="does not launch"):
        _norm_record("rope")
    with pytest.raises(ValueError, match="family"):
        _norm_record("softmax")


def test_version_1_records_still_read(tmp_path: Path) -> None:
    row = make_record(AttentionSpec(1, 2, 2, 64, 64, 16, 16, "float32", 0.25), TileConfig(32, 32, 4, 2), "h",
                      Measurement.ok(3.0), versions={}, features={}).to_dict()  # fmt: skip
    old = {k: v for k, v in row.items() if k != "family"} | {"version": 1}
    old["config"] = {k: v for k, v in old["config"].items() if k != "num_splits"}
    path = tmp_path / "v1.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps(old) + "\n")
    (record,) = iter_records(path)
    assert record.family == "attention" and record.version == 2 and record.median_ms == 0.003
    with pytest.raises(ValueError, match="unknown fields"):
        MeasurementRecord.from_dict({**old, "family": "norm"})


# ------------------------------------------------------------------------------------------------------ checks
def test_wrong_output_is_caught() -> None:
    case = kernel_case(NORM, "norm", "cpu")
    assert case.names == ("y",) and case.mismatch(tuple(t.clone() for t in case.expected)) is None
    wrong = case.mismatch((case.expected[0] + 0.5,))
    assert wrong is not None and wrong.startswith("y: max error")
    bad = interpreter_measure(NORM, TileConfig(num_warps=3), "norm")  # not a power of two: the launch refuses it
    assert bad.status == "compile-fail"
    assert interpreter_measure(NORM, TileConfig(), "rope").status == "error"  # a norm Spec launches no RoPE kernel


def test_gpu_measure_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        gpu_measure(NORM, TileConfig(), "norm")


def test_families_match_the_search_space() -> None:
    assert FAMILIES == KERNEL_FAMILIES and set(TINY_CHOICES) == set(FAMILIES)


def test_reference_in_pieces_matches_the_whole_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tilefuse.codegen import reference as ref
    from tilefuse.costmodel import cases

    spec = AttentionSpec(2, 4, 2, 8, 8, 16, 16, "float32", 0.25, True, alibi=True, mask="key_padding", gqa_group=2)
    inputs, flags = cases._attention_inputs(spec, cases._Random("cpu", "float32"))
    grad = torch.randn(2, 4, 8, 16)
    monkeypatch.setattr(cases, "REFERENCE_CHUNK_ELEMENTS", 2 * 8 * 8)  # one kv head (two q heads) per piece
    assert len(cases._reference_chunks(inputs, flags)) == 4
    torch.testing.assert_close(cases._reference_forward(inputs, flags), ref.attention_forward(inputs, flags))
    for piecewise, whole in zip(cases._reference_backward(grad, inputs, flags),
                                ref.attention_backward(grad, inputs, flags), strict=True):  # fmt: skip
        torch.testing.assert_close(piecewise, whole)


@pytest.mark.parametrize("kind", ["norm", "norm_backward"])
def test_norm_cases_launch_the_configs_row_block(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A measured norm config runs at its own row block: a block narrower than the row launches the chunked kernel
    (the cases once dropped block_n, so configs differing only in it were all timed at the launcher default)."""
    case = kernel_case(NORM, kind, "cpu")
    monkeypatch.setenv("TILEFUSE_DUMP_KERNELS", str(tmp_path))  # every kernel launched from here is copied there
    outputs = case.launch(TileConfig(block_n=16, num_warps=1, num_splits=2))
    assert case.mismatch(outputs) is None
    launched = [p.name for p in tmp_path.iterdir()]
    assert any("chunked" in name for name in launched), launched
