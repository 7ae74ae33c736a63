"""The tuning database: best config and every trial per TuningKey, in SQLite (default, one file in the user cache)
or PostgreSQL (many workers), through SQLAlchemy Core.

Where: the `url` argument, else $TILEFUSE_TUNING_DB, else $TILEFUSE_CACHE_DIR/tuning.sqlite (default
~/.cache/tilefuse/tuning.sqlite). A plain path means an SQLite file. The schema is versioned (table
`tilefuse_meta`); SQLite files run in WAL mode and every write is one `BEGIN IMMEDIATE` transaction, so concurrent
writers queue instead of interleaving. A corrupt file, or one another program owns, raises `TuningDBError` — or,
with `recover=True`, is moved aside with a logged warning and rebuilt. Rows are validated when read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from tilefuse.costmodel.cache import cache_root

from .keys import TuningKey
from .records import SOURCE_RANK, TuningRecord
from .sqlite_check import SqliteState, inspect_sqlite_file

log = logging.getLogger("tilefuse.autotune")

SCHEMA_VERSION = 1
APP_NAME = "tilefuse-tuning"
EXPORT_FORMAT = "tilefuse-tuning-db"
ENV_URL = "TILEFUSE_TUNING_DB"

_metadata = sa.MetaData()
meta_table = sa.Table(
    "tilefuse_meta", _metadata, sa.Column("name", sa.String(64), primary_key=True), sa.Column("value", sa.Text)
)
entries_table = sa.Table(
    "tilefuse_entries", _metadata,
    sa.Column("key_digest", sa.String(64), primary_key=True),
    sa.Column("family", sa.String(32), nullable=False),
    sa.Column("arch", sa.String(16), nullable=False),
    sa.Column("dtype", sa.String(16), nullable=False),
    sa.Column("key_json", sa.Text, nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("best_json", sa.Text),
    sa.Column("best_latency_us", sa.Float),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)  # fmt: skip
trials_table = sa.Table(
    "tilefuse_trials", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key_digest", sa.String(64), sa.ForeignKey("tilefuse_entries.key_digest", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("trial_json", sa.Text, nullable=False),
)  # fmt: skip
OUR_TABLES = frozenset(t.name for t in _metadata.sorted_tables)


class TuningDBError(RuntimeError):
    """The tuning database cannot be used as it is (corrupt, foreign, newer schema, malformed rows)."""


def default_url() -> str:
    """$TILEFUSE_TUNING_DB, else an SQLite file in the tilefuse cache folder."""
    return os.environ.get(ENV_URL) or str(cache_root() / "tuning.sqlite")


def normalize_url(url: str | os.PathLike[str] | None) -> str:
    """An SQLAlchemy URL: `postgresql://...` and `sqlite:///...` stay, a plain path becomes an SQLite URL."""
    text = os.fspath(url) if url is not None else default_url()
    if not text:
        raise ValueError("tuning database url must be a non-empty path or URL")
    if "://" in text:
        if not text.startswith(("sqlite://", "postgresql")):
            raise ValueError(f"tuning database url {text!r}: expected a file path, sqlite:///... or postgresql://...")
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; tilefuse depends on psycopg2 (binary wheels).
        return (
            "postgresql+psycopg2://" + text.removeprefix("postgresql://") if text.startswith("postgresql://") else text
        )
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file of an `sqlite:///` URL (None for other databases or in-memory SQLite)."""
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def _sqlite_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class TuningDB:
    """Get, record, list, export, import and clear tuning records."""

    def __init__(self, url: str | os.PathLike[str] | None = None, *, recover: bool = False) -> None:
        self.url = normalize_url(url)
        self.path = sqlite_path(self.url)
        if self.path is not None:
            self._prepare_file(self.path, recover)
            self.engine = _sqlite_engine(self.url)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True)
        self._init_schema()

    def __repr__(self) -> str:
        return f"TuningDB({self.engine.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------------------------------------ opening
    def _prepare_file(self, path: Path, recover: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state, why = inspect_sqlite_file(path, OUR_TABLES, APP_NAME)
        if state in (SqliteState.NEW, SqliteState.OURS):
            return
        problem = f"tuning database {path} is {state.value}: {why}"
        if not recover:
            raise TuningDBError(
                f"{problem}. Move it away, point TILEFUSE_TUNING_DB elsewhere, or open it with recover=True "
                "(`tilefuse db clear --recover`) to move it aside and start an empty database."
            )
        aside = path.with_name(f"{path.name}.{state.name.lower()}-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.replace(Path(f"{aside}{suffix}"))
        log.warning("%s; moved it to %s and started an empty tuning database", problem, aside)

    def _init_schema(self) -> None:
        with self._write() as conn:
            _metadata.create_all(conn)
            rows = dict(conn.execute(sa.select(meta_table.c.name, meta_table.c.value)).all())
            if not rows:
                conn.execute(sa.insert(meta_table), [
                    {"name": "app", "value": APP_NAME}, {"name": "schema_version", "value": str(SCHEMA_VERSION)},
                ])  # fmt: skip
                return
        _check_meta(rows, self.url)

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.DatabaseError as err:
            raise TuningDBError(f"tuning database {self.url}: {err.orig or err}") from err

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except sa.exc.DatabaseError as err:
            raise TuningDBError(f"tuning database {self.url}: {err.orig or err}") from err

    def close(self) -> None:
        self.engine.dispose()

    # -------------------------------------------------------------------------------------------- reads
    def get(self, key: TuningKey) -> TuningRecord | None:
        """The record of `key`, or None. Raises TuningDBError when the stored row is malformed."""
        with self._read() as conn:
            row = conn.execute(sa.select(entries_table).where(entries_table.c.key_digest == key.digest)).first()
            if row is None:
                return None
            trials = conn.execute(
                sa.select(trials_table.c.trial_json).where(trials_table.c.key_digest == key.digest)
                .order_by(trials_table.c.id)
            ).scalars().all()  # fmt: skip
        record = _record_from_row(row._mapping, trials, self.url)
        if record.key != key:
            raise TuningDBError(f"tuning database {self.url}: row {key.digest[:12]} holds another key")
        return record

    def records(self, family: str | None = None, with_trials: bool = False) -> list[TuningRecord]:
        """Every record (newest first), optionally of one family; trials only when asked."""
        query = sa.select(entries_table).order_by(entries_table.c.updated_at.desc())
        if family is not None:
            query = query.where(entries_table.c.family == family)
        with self._read() as conn:
            rows = conn.execute(query).all()
            trials: dict[str, list[str]] = {}
            if with_trials:
                for digest, text in conn.execute(sa.select(trials_table.c.key_digest, trials_table.c.trial_json)
                                                 .order_by(trials_table.c.id)):  # fmt: skip
                    trials.setdefault(digest, []).append(text)
        return [_record_from_row(r._mapping, trials.get(r.key_digest, []), self.url) for r in rows]

    def find(self, prefix: str) -> TuningRecord:
        """The record whose key digest starts with `prefix` (as `tilefuse db list` shows it)."""
        if not prefix or not all(c in "0123456789abcdef" for c in prefix):
            raise ValueError(f"expected a hex key digest prefix, got {prefix!r}")
        with self._read() as conn:
            digests = conn.execute(
                sa.select(entries_table.c.key_digest).where(entries_table.c.key_digest.startswith(prefix))
            ).scalars().all()  # fmt: skip
        if len(digests) != 1:
            raise KeyError(f"{len(digests)} entries match {prefix!r}; give a longer prefix" if digests
                           else f"no entry matches {prefix!r}")  # fmt: skip
        record = next(r for r in self.records(with_trials=True) if r.key.digest == digests[0])
        return record

    # ------------------------------------------------------------------------------------------- writes
    def record(self, record: TuningRecord) -> bool:
        """Store `record`'s trials and, unless a better-sourced best exists (exhaustive > measure > model), its
        best config. Returns whether the best config was stored. One transaction."""
        digest = record.key.digest
        with self._write() as conn:
            old = conn.execute(
                sa.select(entries_table.c.source).where(entries_table.c.key_digest == digest)
            ).scalar()  # fmt: skip
            store_best = old is None or SOURCE_RANK[record.source] >= SOURCE_RANK.get(old, 0)
            values = _entry_values(record)
            if old is None:
                conn.execute(sa.insert(entries_table).values(**values))
            elif store_best:
                conn.execute(sa.update(entries_table).where(entries_table.c.key_digest == digest).values(**values))
            if record.trials:
                conn.execute(sa.insert(trials_table), [
                    {"key_digest": digest, "trial_json": json.dumps(t.to_dict(), sort_keys=True)}
                    for t in record.trials
                ])  # fmt: skip
        return store_best

    def clear(self, family: str | None = None) -> int:
        """Delete every record (or one family's); returns how many."""
        with self._write() as conn:
            digests = sa.select(entries_table.c.key_digest)
            if family is not None:
                digests = digests.where(entries_table.c.family == family)
            conn.execute(sa.delete(trials_table).where(trials_table.c.key_digest.in_(digests)))
            deleted = conn.execute(sa.delete(entries_table).where(entries_table.c.key_digest.in_(digests)))
        return int(deleted.rowcount or 0)

    # ------------------------------------------------------------------------------------ export/import
    def export_json(self, family: str | None = None) -> dict[str, Any]:
        return {
            "format": EXPORT_FORMAT, "schema_version": SCHEMA_VERSION, "exported_at": time.time(),
            "entries": [r.to_dict() for r in self.records(family, with_trials=True)],
        }  # fmt: skip

    def import_json(self, data: Any) -> int:
        """Record every entry of an export (validated first: all or nothing). Returns how many were read."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not a tilefuse tuning export (expected format {EXPORT_FORMAT!r})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"tuning export has schema_version {version!r}; this tilefuse reads {SCHEMA_VERSION}")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise ValueError("tuning export: 'entries' must be a list")
        records = []
        for index, entry in enumerate(entries):
            try:
                records.append(TuningRecord.from_dict(entry))
            except (TypeError, ValueError) as err:
                raise ValueError(f"tuning export entry {index}: {err}") from err
        for record in records:
            self.record(record)
        return len(records)


def _check_meta(rows: dict[str, str], url: str) -> None:
    if rows.get("app") != APP_NAME:
        raise TuningDBError(f"{url}: tilefuse_meta belongs to {rows.get('app')!r}, not {APP_NAME!r}")
    version = int(rows.get("schema_version", "0"))
    if version > SCHEMA_VERSION:
        raise TuningDBError(f"{url}: tuning schema {version} is newer than this tilefuse's {SCHEMA_VERSION}; upgrade")
    if version < SCHEMA_VERSION:  # no older schema has shipped; any future migration goes here
        raise TuningDBError(f"{url}: tuning schema {version} is unknown; clear the database")


def _entry_values(record: TuningRecord) -> dict[str, Any]:
    data = record.to_dict()
    return {
        "key_digest": record.key.digest, "family": record.key.family, "arch": record.key.arch,
        "dtype": record.key.dtype, "key_json": json.dumps(data["key"], sort_keys=True),
        "spec_json": json.dumps(record.spec, sort_keys=True),
        "best_json": json.dumps(data["best"], sort_keys=True) if record.best is not None else None,
        "best_latency_us": data["best_latency_us"], "source": record.source, "updated_at": record.updated_at,
    }  # fmt: skip


def _record_from_row(row: Any, trials: list[str] | Any, url: str) -> TuningRecord:
    try:
        data = {
            "key": json.loads(row["key_json"]), "key_digest": row["key_digest"],
            "best": json.loads(row["best_json"]) if row["best_json"] is not None else None,
            "best_latency_us": row["best_latency_us"], "source": row["source"],
            "spec": json.loads(row["spec_json"]), "updated_at": row["updated_at"],
            "trials": [json.loads(t) for t in trials],
        }  # fmt: skip
        return TuningRecord.from_dict(data)
    except (TypeError, ValueError, KeyError) as err:
        raise TuningDBError(f"tuning database {url}: malformed entry {row['key_digest']!r}: {err}") from err
