"""Measurement records (DESIGN.md): one (Spec, config, GPU) measured or refused, with versions, latency quantiles,
a status and the features the cost model reads. Stored as gzip-compressed JSON lines under `data/`; the writer
appends whole gzip members so an interrupted collection leaves a readable file, and the reader validates every row.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilefuse.codegen.families import KERNEL_FAMILIES, kernel_family, spec_families
from tilefuse.codegen.tile_config import TileConfig, config_from_dict, config_to_dict
from tilefuse.costmodel.measure import Measurement
from tilefuse.specs import Spec, spec_from_dict, spec_to_json

RECORD_VERSION = 2  # 2: `family` (the kernel family measured); version-1 rows are attention forward records
READABLE_VERSIONS = (1, RECORD_VERSION)
# ok: measured and checked; infeasible: refused by constraints, the compiler or the launch (out of resources);
# mismatch: ran but its output disagreed with the reference; error: anything else (see `detail`).
STATUSES = ("ok", "infeasible", "error", "mismatch")
QUANTILES = ("p20", "median", "p80")
_FROM_MEASUREMENT = {
    "ok": "ok", "compile-fail": "infeasible", "oom": "infeasible", "infeasible": "infeasible",
    "wrong-output": "mismatch", "timeout": "error", "error": "error", "predicted": "error",
}  # fmt: skip


@dataclass(frozen=True)
class MeasurementRecord:
    """One row of a measurement file. `latency_ms` holds QUANTILES when status is "ok" and is empty otherwise;
    `interpreted` marks wall times of the Triton interpreter (test data, never GPU truth); `family` is the kernel
    family measured (codegen.families.KERNEL_FAMILIES)."""

    spec: dict[str, Any]
    config: dict[str, int]
    gpu: str
    status: str
    latency_ms: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    detail: str | None = None
    interpreted: bool = False
    family: str = "attention"
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def tile_config(self) -> TileConfig:
        return config_from_dict(self.config)

    @property
    def spec_json(self) -> str:
        return json.dumps(self.spec, sort_keys=True)

    @property
    def group(self) -> str:
        """Records compare only within a group: the same Spec and kernel family on the same GPU (and the same timing
        source)."""
        return f"{self.gpu}|{'interp' if self.interpreted else 'gpu'}|{self.family}|{self.spec_json}"

    @property
    def key(self) -> str:
        """What makes a record unique in a file (collection resumes by skipping known keys)."""
        text = f"{self.group}|{json.dumps(self.config, sort_keys=True)}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @property
    def median_ms(self) -> float:
        return float(self.latency_ms["median"]) if self.status == "ok" else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "spec": self.spec, "config": self.config, "gpu": self.gpu,
            "status": self.status, "latency_ms": self.latency_ms, "versions": self.versions,
            "features": self.features, "detail": self.detail, "interpreted": self.interpreted, "family": self.family,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: object) -> MeasurementRecord:
        if not isinstance(data, dict):
            raise TypeError(f"a measurement record must be a dict, got {type(data).__name__}")
        version = data.get("version", RECORD_VERSION)
        if version not in READABLE_VERSIONS:
            raise ValueError(f"record version {version!r}; this tilefuse reads versions {list(READABLE_VERSIONS)}")
        known = {"version", "spec", "config", "gpu", "status", "latency_ms", "versions", "features", "detail",
                 "interpreted"} | ({"family"} if version >= 2 else set())  # fmt: skip
        extra = set(data) - known
        if extra:
            raise ValueError(f"version-{version} measurement record has unknown fields {sorted(extra)}")
        # Read as the current version: a version-1 row differs only by the absent family (attention forward).
        return cls(
            spec=data.get("spec"), config=data.get("config"), gpu=data.get("gpu"),  # type: ignore[arg-type]
            status=data.get("status"), latency_ms=data.get("latency_ms") or {},  # type: ignore[arg-type]
            versions=data.get("versions") or {}, features=data.get("features") or {},
            detail=data.get("detail"), interpreted=bool(data.get("interpreted", False)),
            family=data.get("family", "attention"),
        )  # fmt: skip


def _validate(record: MeasurementRecord) -> None:
    if record.version != RECORD_VERSION:
        raise ValueError(f"record version {record.version!r}; this tilefuse reads version {RECORD_VERSION}")
    if record.status not in STATUSES:
        raise ValueError(f"record status={record.status!r}; expected one of {list(STATUSES)}")
    if not isinstance(record.spec, dict):
        raise TypeError(f"record spec must be a dict (Spec.to_dict()), got {type(record.spec).__name__}")
    spec = spec_from_dict(record.spec)  # raises on an unknown kind or bad fields
    if record.family not in KERNEL_FAMILIES:
        raise ValueError(f"record family={record.family!r}; expected one of {list(KERNEL_FAMILIES)}")
    if record.family not in spec_families(spec):
        raise ValueError(f"record family={record.family!r} does not launch a {spec.kind} spec")
    config_from_dict(record.config)
    if not isinstance(record.gpu, str) or not record.gpu:
        raise ValueError(f"record gpu must be a non-empty GPU name, got {record.gpu!r}")
    if record.status == "ok":
        if set(record.latency_ms) != set(QUANTILES):
            raise ValueError(f"an ok record needs latency_ms with {list(QUANTILES)}, got {record.latency_ms!r}")
        for name, value in record.latency_ms.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
                raise ValueError(f"latency_ms[{name!r}]={value!r}: expected a finite number > 0")
    elif record.latency_ms:
        raise ValueError(f"a {record.status!r} record carries no latency, got {record.latency_ms!r}")
    if not isinstance(record.features, dict) or not isinstance(record.versions, dict):
        raise TypeError("record features and versions must be dicts")


def make_record(
    spec: Spec, config: TileConfig, gpu: str, measurement: Measurement, *, versions: dict[str, str],
    features: dict[str, Any], interpreted: bool = False, family: str | None = None,
) -> MeasurementRecord:  # fmt: skip
    """A record from autotune's Measurement (µs quantiles, its own status names) for `spec` and `config` launched by
    kernel `family` (default: the Spec's forward family)."""
    status = _FROM_MEASUREMENT[measurement.status]
    latency = {}
    if status == "ok":
        us = measurement.latency_us
        latency = {"p20": us["p20"] / 1e3, "median": us["p50"] / 1e3, "p80": us["p80"] / 1e3}
    detail = measurement.status if measurement.error is None else f"{measurement.status}: {measurement.error}"
    return MeasurementRecord(
        json.loads(spec_to_json(spec)), config_to_dict(config), gpu, status, latency, versions, features,
        None if status == "ok" else detail, interpreted, family or kernel_family(spec),
    )  # fmt: skip


def write_records(path: str | Path, records: Iterable[MeasurementRecord]) -> int:
    """Append `records` to the gzip JSON-lines file at `path` as one gzip member; returns how many were written."""
    rows = [json.dumps(r.to_dict(), sort_keys=True, allow_nan=False) + "\n" for r in records]
    if rows:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "at", encoding="utf-8") as handle:
            handle.writelines(rows)
    return len(rows)


def iter_records(path: str | Path) -> Iterator[MeasurementRecord]:
    """Every record of the file, validated; ValueError naming the file and line on a bad row."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield MeasurementRecord.from_dict(json.loads(line))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: bad measurement record: {err}") from err


def read_records(paths: Iterable[str | Path]) -> list[MeasurementRecord]:
    return [record for path in paths for record in iter_records(path)]
