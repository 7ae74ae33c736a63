"""Which cost model ranks configs: a learned model file (MLP or gradient-boosted, told apart by their "format"),
the one shipped for the target GPU, or none — then the analytic model alone.

Shipped models live in `costmodel/models/<gpu slug>.json` (e.g. `h100-sxm.json`), trained by
`tilefuse costmodel train` on GPU measurements; `$TILEFUSE_COST_MODEL` (a model path, or "analytic") overrides
the choice. No model is shipped until GPU measurements exist, so today the analytic model ranks everywhere.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tilefuse.codegen.tile_config import TileConfig
from tilefuse.specs import Spec

from .hardware import GPUSpec
from .records import MeasurementRecord

log = logging.getLogger("tilefuse.costmodel")

MODEL_ENV = "TILEFUSE_COST_MODEL"
SHIPPED_DIR = Path(__file__).parent / "models"


class CostModel(Protocol):
    """What evaluation and the autotuner need of a learned model."""

    trained_on: dict[str, Any]

    def predict(self, records: Sequence[MeasurementRecord]) -> tuple[np.ndarray, np.ndarray]: ...

    def rank_scores(self, records: Sequence[MeasurementRecord]) -> np.ndarray: ...

    def save(self, path: str | Path) -> None: ...


def load_model(path: str | Path) -> CostModel:
    """A saved cost model of either kind; ValueError naming the problem for anything else."""
    from .gbdt import MODEL_FORMAT as GBDT_FORMAT
    from .gbdt import GBDTModel
    from .learned import MODEL_FORMAT as MLP_FORMAT
    from .learned import LearnedModel

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read cost model {path}: {err}") from err
    kind = data.get("format") if isinstance(data, dict) else None
    if kind == GBDT_FORMAT:
        return GBDTModel.from_dict(data)
    if kind == MLP_FORMAT:
        return LearnedModel.from_dict(data)
    raise ValueError(f"{path} is not a tilefuse cost model (format {kind!r}; expected {MLP_FORMAT} or {GBDT_FORMAT})")


def gpu_slug(name: str) -> str:
    """The file stem of a GPU's shipped model: "NVIDIA H100 SXM" -> "h100-sxm"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-")


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> CostModel:
    return load_model(path)


def model_for(gpu: GPUSpec) -> CostModel | None:
    """The learned model that ranks configs for `gpu`: $TILEFUSE_COST_MODEL, else the shipped one, else None (the
    analytic model ranks). A model that cannot be loaded is logged and skipped, never fatal."""
    override = os.environ.get(MODEL_ENV)
    if override == "analytic":
        return None
    path = Path(override) if override else SHIPPED_DIR / f"{gpu_slug(gpu.name)}.json"
    if not path.exists():
        if override:
            log.warning("%s=%s does not exist; the analytic model ranks configs", MODEL_ENV, override)
        return None
    try:
        return _load_cached(str(path), path.stat().st_mtime)
    except (ValueError, ImportError) as err:
        log.warning("cost model %s unusable (%s); the analytic model ranks configs", path, err)
        return None


def candidate_records(spec: Spec, configs: Sequence[TileConfig], gpu: GPUSpec, kind: str) -> list[MeasurementRecord]:
    """Unmeasured records of `configs` (analytic features only), the input a learned model scores."""
    from tilefuse.costmodel.measure import Measurement

    from .collect import record_features
    from .records import make_record

    return [make_record(spec, config, gpu.name, Measurement("error", error="not measured"), versions={},
                        features=record_features(spec, config, gpu, False, kind), family=kind)
            for config in configs]  # fmt: skip


def learned_scores(model: CostModel, spec: Spec, configs: Sequence[TileConfig], gpu: GPUSpec, kind: str) -> np.ndarray:
    """The model's rank scores of `configs` (lower = predicted faster; +inf: predicted infeasible)."""
    return np.asarray(model.rank_scores(candidate_records(spec, configs, gpu, kind)), dtype=np.float64)
