"""Look at an SQLite file before trusting it: new, ours, shared with Optuna, corrupt, or another program's."""

from __future__ import annotations

import enum
import sqlite3
from pathlib import Path

SQLITE_HEADER = b"SQLite format 3\x00"
# Optuna's RDB storage may share the file (`tilefuse tune --mode measure` keeps its studies next to the results).
OPTUNA_TABLES = frozenset({
    "studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials",
    "trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values", "trial_intermediate_values",
    "trial_heartbeats", "version_info", "alembic_version",
})  # fmt: skip


class SqliteState(enum.Enum):
    NEW = "new"  # missing, empty, or no tables of anyone else
    OURS = "ours"
    CORRUPT = "corrupt"
    FOREIGN = "foreign"


def inspect_sqlite_file(path: Path, our_tables: frozenset[str], app: str) -> tuple[SqliteState, str]:
    """(state, why) of the file at `path`; never modifies it."""
    if not path.exists() or path.stat().st_size == 0:
        return SqliteState.NEW, "no file yet"
    with path.open("rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        return SqliteState.FOREIGN, "not an SQLite database (bad header)"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            check = [row[0] for row in conn.execute("PRAGMA quick_check")]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            owner = _owner(conn) if "tilefuse_meta" in tables else None
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        return SqliteState.CORRUPT, f"SQLite cannot read it ({err})"
    if check != ["ok"]:
        return SqliteState.CORRUPT, f"integrity check failed: {'; '.join(check[:3])}"
    tables -= {"sqlite_sequence"}
    if owner is not None and owner != app:
        return SqliteState.FOREIGN, f"its tilefuse_meta names app {owner!r}"
    strangers = tables - our_tables - OPTUNA_TABLES
    if strangers:
        return SqliteState.FOREIGN, f"it holds tables of another program: {sorted(strangers)[:5]}"
    return (SqliteState.OURS if our_tables <= tables else SqliteState.NEW), "ok"


def _owner(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM tilefuse_meta WHERE name = 'app'").fetchone()
    return str(row[0]) if row else None
