"""CPU forward latency: eager vs torch.compile (Inductor) vs torch.compile(backend="tilefuse").

On CPU the tilefuse ops run their reference implementations, so this checks that fusing costs nothing on CPU
(issue 2: "a compiled model is not slower than eager"); GPU speed is the benchmarks issue's job. All contenders
are measured side by side in one process, interleaved, and outputs are checked before timing.

    python benchmarks/cpu_e2e.py [--models demo hf:llama] [--seq 128] [--out benchmarks/results/cpu/e2e.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tilefuse
from tilefuse.compiler.presets import load_model


def _contenders(model: torch.nn.Module) -> dict[str, Callable[..., Any]]:
    return {
        "eager": model,
        "inductor": torch.compile(model),
        "tilefuse": tilefuse.compile(model, strict=True),
    }


def _time_ms(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> float:
    start = time.perf_counter()
    fn(*inputs)
    return (time.perf_counter() - start) * 1e3


def measure(name: str, batch: int, seq: int, repeats: int) -> dict[str, Any]:
    torch._dynamo.reset()
    model, inputs = load_model(name, batch=batch, seq=seq)
    contenders = _contenders(model)
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.no_grad():
        reference = model(*inputs)
        for label, fn in contenders.items():
            got = fn(*inputs)
            if not torch.allclose(got, reference, atol=1e-4, rtol=1e-4):
                raise AssertionError(f"{name}: {label} output differs from eager by {(got - reference).abs().max()}")
            for _ in range(3):  # warm-up
                fn(*inputs)
        for _ in range(repeats):  # interleaved, so drift hits every contender alike
            for label, fn in contenders.items():
                samples[label].append(_time_ms(fn, inputs))
    median = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "model": name,
        "batch": batch,
        "seq": seq,
        "repeats": repeats,
        "median_ms": median,
        "speedup_vs_eager": {k: median["eager"] / v for k, v in median.items()},
        "speedup_vs_inductor": {k: median["inductor"] / v for k, v in median.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "hf:llama", "hf:gpt2", "hf:bert"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/e2e.json"))
    args = parser.parse_args()
    rows = [measure(m, args.batch, args.seq, args.repeats) for m in args.models]
    print(f"{'model':<12} {'eager ms':>9} {'inductor ms':>11} {'tilefuse ms':>11} {'tf/eager':>9} {'tf/inductor':>11}")
    for row in rows:
        m, s, si = row["median_ms"], row["speedup_vs_eager"], row["speedup_vs_inductor"]
        speed = f"{s['tilefuse']:>8.2f}x {si['tilefuse']:>10.2f}x"
        print(f"{row['model']:<12} {m['eager']:>9.2f} {m['inductor']:>11.2f} {m['tilefuse']:>11.2f} {speed}")
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "note": "CPU; tilefuse ops run reference implementations",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
