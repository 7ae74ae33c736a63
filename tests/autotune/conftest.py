"""Every autotune test gets its own cache folder and tuning database (never the user's ~/.cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tilefuse.autotune import registry


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEFUSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TILEFUSE_TUNING_DB", raising=False)
    monkeypatch.delenv("TILEFUSE_GPU", raising=False)
    registry.clear()
