"""What tuning produces: one Trial per config tried (measured, predicted or failed) and one TuningRecord per key —
the best config and every trial. Plain JSON in and out; `from_dict` validates, so a damaged row or a hand-edited
export fails loudly instead of yielding a wrong config.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from tilefuse.codegen.tile_config import TileConfig, config_from_dict, config_to_dict
from tilefuse.costmodel.measure import Measurement

from .keys import TuningKey

# Which record wins when two searches stored a best config for one key: ground truth > measured > predicted.
SOURCE_RANK = {"model": 1, "measure": 2, "exhaustive": 3}


@dataclass(frozen=True)
class Trial:
    config: TileConfig
    status: str
    latency_us: dict[str, float] = field(default_factory=dict)
    predicted_us: float | None = None
    error: str | None = None

    @property
    def median_us(self) -> float:
        return Measurement(self.status, self.latency_us).median_us

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": config_to_dict(self.config), "status": self.status, "latency_us": dict(self.latency_us),
            "predicted_us": _finite_or_none(self.predicted_us), "error": self.error,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        if not isinstance(data, dict):
            raise TypeError(f"a trial must be a dict, got {type(data).__name__}")
        status = data.get("status")
        Measurement(str(status))  # validates the status
        latency = data.get("latency_us") or {}
        if not isinstance(latency, dict) or not all(isinstance(v, int | float) for v in latency.values()):
            raise ValueError(f"trial latency_us must map quantile names to numbers, got {latency!r}")
        predicted = data.get("predicted_us")
        return cls(
            config_from_dict(data.get("config")), str(status), {str(k): float(v) for k, v in latency.items()},
            float(predicted) if predicted is not None else None, data.get("error"),
        )  # fmt: skip


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class TuningRecord:
    """The result of tuning one key: `best` (None when every config failed), its latency, where it came from
    ("model", "measure", "exhaustive"), the Spec it was tuned on, and every trial."""

    key: TuningKey
    best: TileConfig | None
    best_latency_us: float | None
    source: str
    spec: dict[str, Any]
    trials: tuple[Trial, ...] = ()
    updated_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.source not in SOURCE_RANK:
            raise ValueError(f"source={self.source!r}; expected one of {list(SOURCE_RANK)}")

    def with_trials(self, trials: tuple[Trial, ...]) -> TuningRecord:
        return replace(self, trials=trials)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.to_dict(), "key_digest": self.key.digest,
            "best": config_to_dict(self.best) if self.best is not None else None,
            "best_latency_us": _finite_or_none(self.best_latency_us), "source": self.source, "spec": self.spec,
            "trials": [t.to_dict() for t in self.trials], "updated_at": self.updated_at,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuningRecord:
        """Validate and rebuild; ValueError when the stored digest does not match the key it claims."""
        if not isinstance(data, dict):
            raise TypeError(f"a tuning record must be a dict, got {type(data).__name__}")
        key = TuningKey.from_dict(data.get("key"))  # type: ignore[arg-type]
        digest = data.get("key_digest")
        if digest is not None and digest != key.digest:
            raise ValueError(f"tuning record key_digest {digest!r} does not match its key ({key.digest})")
        best = data.get("best")
        latency = data.get("best_latency_us")
        spec = data.get("spec") or {}
        if not isinstance(spec, dict):
            raise ValueError(f"tuning record spec must be a dict, got {type(spec).__name__}")
        return cls(
            key, config_from_dict(best) if best is not None else None,
            float(latency) if latency is not None else None, str(data.get("source")), spec,
            tuple(Trial.from_dict(t) for t in data.get("trials") or ()), float(data.get("updated_at") or 0.0),
        )  # fmt: skip
