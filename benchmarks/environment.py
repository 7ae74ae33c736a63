"""The environment record stored with every result: machine, GPU (name, driver, clocks when readable), versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit", "pstate")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(args: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=cwd, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _nvidia_smi(index: int) -> dict[str, str]:
    """Driver and current/max SM clocks from nvidia-smi, when it exists (clocks are not fixed by this harness)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    query = f"--query-gpu={','.join(_SMI_FIELDS)}"
    out = _command(["nvidia-smi", query, "--format=csv,noheader", f"--id={index}"])
    if not out:
        return {}
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return {f"smi_{k.replace('.', '_')}": v for k, v in zip(_SMI_FIELDS, values, strict=False)}


def _gpu(device: torch.device) -> dict[str, Any]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info: dict[str, Any] = {
        "gpu": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda_runtime": torch.version.cuda,
    }
    try:
        info["sm_clock_mhz"] = torch.cuda.clock_rate(index)  # needs pynvml; absent on some machines
    except Exception:
        info["sm_clock_mhz"] = None
    info.update(_nvidia_smi(index))
    info["driver_version"] = info.get("smi_driver_version")
    return info


def gpu_slug(device: torch.device) -> str:
    """Folder name for results: 'cpu' or the GPU name in lower case ('nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to interpret a result file later, on another machine."""
    repo = Path(__file__).resolve().parent.parent
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "tilefuse": _version("tilefuse"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "git_commit": _command(["git", "rev-parse", "--short", "HEAD"], cwd=repo),
        "git_dirty": bool(_command(["git", "status", "--porcelain"], cwd=repo)),
        "device": str(device),
    }
    if device.type == "cuda":
        env.update(_gpu(device))
    return env
