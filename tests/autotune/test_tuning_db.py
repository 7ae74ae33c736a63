"""The tuning database: round trips, export/import, corrupt and foreign files, schema versions, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from tilefuse.autotune.db import SCHEMA_VERSION, TuningDB, TuningDBError, default_url
from tilefuse.autotune.keys import tuning_key
from tilefuse.autotune.records import Trial, TuningRecord
from tilefuse.codegen.plan import TileConfig
from tilefuse.specs import AttentionSpec


def spec(q_len: int = 512) -> AttentionSpec:
    return AttentionSpec(2, 8, 8, q_len, q_len, 64, 64, "bfloat16", 0.125, causal=True)


BEST = TileConfig(128, 64, 8, 3)


def record(q_len: int = 512, best: TileConfig = BEST, source: str = "measure",
           latency: float = 10.0) -> TuningRecord:  # fmt: skip
    trials = (Trial(best, "ok", {"p20": latency * 0.99, "p50": latency, "p80": latency * 1.01}, 12.0),
              Trial(TileConfig(64, 16, 2, 1), "compile-fail", error="out of resource"))  # fmt: skip
    return TuningRecord(tuning_key(spec(q_len), "sm_90"), best, latency, source, spec(q_len).to_dict(), trials)


def test_default_location_follows_the_cache_dir(tmp_path: Path) -> None:
    assert default_url() == str(tmp_path / "cache" / "tuning.sqlite")
    db = TuningDB()
    assert db.path == tmp_path / "cache" / "tuning.sqlite" and db.path.exists()


def test_env_var_overrides_the_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEFUSE_TUNING_DB", str(tmp_path / "elsewhere.sqlite"))
    assert TuningDB().path == tmp_path / "elsewhere.sqlite"


def test_record_and_get_round_trip(tmp_path: Path) -> None:
    db = TuningDB(tmp_path / "t.sqlite")
    rec = record()
    assert db.get(rec.key) is None
    assert db.record(rec)
    got = db.get(rec.key)
    assert got is not None and got.best == rec.best and got.trials == rec.trials
    assert db.get(tuning_key(spec(4096), "sm_90")) is None


def test_a_model_guess_never_replaces_a_measured_best(tmp_path: Path) -> None:
    db = TuningDB(tmp_path / "t.sqlite")
    db.record(record(best=TileConfig(128, 64, 8, 3), source="measure"))
    assert not db.record(record(best=TileConfig(64, 32, 4, 2), source="model"))
    got = db.get(record().key)
    assert got is not None and got.best == TileConfig(128, 64, 8, 3) and got.source == "measure"
    assert len(got.trials) == 4  # every trial is kept
    assert db.record(record(best=TileConfig(64, 64, 4, 2), source="exhaustive"))
    assert db.get(record().key).best == TileConfig(64, 64, 4, 2)  # type: ignore[union-attr]


def test_export_import_round_trip(tmp_path: Path) -> None:
    source = TuningDB(tmp_path / "a.sqlite")
    for q_len in (128, 512, 2048):
        source.record(record(q_len))
    exported = json.loads(json.dumps(source.export_json()))
    target = TuningDB(tmp_path / "b.sqlite")
    assert target.import_json(exported) == 3
    assert {r.key for r in target.records()} == {r.key for r in source.records()}
    assert target.get(record(2048).key).trials == record(2048).trials  # type: ignore[union-attr]


def test_import_rejects_tampered_entries_all_or_nothing(tmp_path: Path) -> None:
    data = TuningDB(tmp_path / "a.sqlite")
    data.record(record(128))
    data.record(record(512))
    exported = data.export_json()
    exported["entries"][1]["key"]["arch"] = "sm_80"  # the digest no longer matches the key
    target = TuningDB(tmp_path / "b.sqlite")
    with pytest.raises(ValueError, match=r"entry 1.*key_digest"):
        target.import_json(exported)
    assert target.records() == []
    with pytest.raises(ValueError, match="not a tilefuse tuning export"):
        target.import_json({"entries": []})
    with pytest.raises(ValueError, match="schema_version"):
        target.import_json({**exported, "schema_version": SCHEMA_VERSION + 1})


def test_garbage_file_is_a_clear_error_and_recover_moves_it_aside(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    path.write_bytes(b"not a database at all" * 50)
    with pytest.raises(TuningDBError, match="not an SQLite database"):
        TuningDB(path)
    assert path.read_bytes().startswith(b"not a database")  # untouched
    db = TuningDB(path, recover=True)
    assert db.records() == []
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("t.sqlite.")]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"not a database")


def test_damaged_sqlite_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    db = TuningDB(path)
    for q_len in (16, 32, 64, 128, 256, 512, 1024, 2048):
        db.record(record(q_len))
    db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096:12288] = b"\xff" * 8192  # overwrite pages after the header
    path.write_bytes(bytes(data))
    with pytest.raises(TuningDBError, match=r"corrupt|foreign|malformed"):
        TuningDB(path).records(with_trials=True)


def test_a_database_of_another_program_is_foreign(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(TuningDBError, match=r"foreign.*invoices"):
        TuningDB(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    TuningDB(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE tilefuse_meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(TuningDBError, match="newer"):
        TuningDB(path)


def test_a_malformed_row_is_an_error_not_a_config(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    db = TuningDB(path)
    db.record(record())
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE tilefuse_entries SET best_json = '{\"block_m\": 64}'")
    with pytest.raises(TuningDBError, match="malformed"):
        db.get(record().key)


def _write_many(path: str, worker: int) -> None:
    db = TuningDB(path)
    for i in range(15):
        db.record(record(16 * (worker * 100 + i + 1), latency=float(worker)))


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    TuningDB(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(path, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    records = TuningDB(path).records(with_trials=True)
    # Buckets: q_len 16·(100w + i + 1) rounds up to powers of two, so some writes share a key; none may be lost.
    expected = {tuning_key(spec(16 * (w * 100 + i + 1)), "sm_90") for w in range(3) for i in range(15)}
    assert {r.key for r in records} == expected
    assert sum(len(r.trials) for r in records) == 3 * 15 * 2
