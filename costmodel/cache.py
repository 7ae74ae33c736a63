"""A JSON-file cache for compiler features: one file per key under $TILEFUSE_CACHE_DIR/features.

Plain JSON only (never pickle): a cache file can come from another machine or an older version, so an unreadable
or malformed entry is treated as a miss.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

_KEY = re.compile(r"^[0-9a-f]{16,128}$")


def cache_root() -> Path:
    """$TILEFUSE_CACHE_DIR, default ~/.cache/tilefuse (shared with codegen's emitted kernels)."""
    root = os.environ.get("TILEFUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tilefuse")
    return Path(root)


class FeatureCache:
    """get/put JSON objects by hex key; `FeatureCache(None)` caches nothing."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path | None:
        if not _KEY.match(key):
            raise ValueError(f"cache key must be a lowercase hex digest, got {key!r}")
        return self.directory / f"{key}.json" if self.directory is not None else None

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader sees the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(value, handle, sort_keys=True)
        os.replace(tmp, path)


def default_cache() -> FeatureCache:
    return FeatureCache(cache_root() / "features")
