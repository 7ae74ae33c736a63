"""Capture and pass time of tilefuse on a deep Llama config (CPU is enough; no kernels run).

Prints a table and writes JSON: Dynamo tracing, ATen capture, passes and inner compile for 2..32 layers.
Target (issue 2): passes <= 1 s for 32 layers on a 2-core machine.

    python benchmarks/pass_time.py [--layers 2 8 32] [--out benchmarks/results/cpu/pass_time.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import tilefuse


def _llama(layers: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, use_cache=False).logits

    return Logits(), (torch.randint(0, 128, (1, 64)),)


def measure(layers: int, repeats: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        torch._dynamo.reset()
        model, inputs = _llama(layers)
        backend = tilefuse.TilefuseBackend(tilefuse.Options(inner="eager", strict=True))
        start = time.perf_counter()
        with torch.no_grad():
            torch.compile(model, backend=backend, fullgraph=True)(*inputs)
        total = time.perf_counter() - start
        t = backend.report.timings_s
        runs.append(
            {
                "total": total,
                "capture": t["capture"],
                "passes": t["passes"],
                "inner": t["inner_compile"],
                "sites": backend.report.summary(),
            }
        )
    median = {k: statistics.median(float(r[k]) for r in runs) for k in ("total", "capture", "passes", "inner")}
    return {"layers": layers, "repeats": repeats, "median_s": median, "sites": runs[-1]["sites"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/pass_time.json"))
    args = parser.parse_args()
    rows = [measure(n, args.repeats) for n in args.layers]
    print(f"{'layers':>6} {'total s':>8} {'capture s':>9} {'passes s':>8} {'inner s':>8}  sites")
    for row in rows:
        m = row["median_s"]
        times = f"{m['total']:>8.2f} {m['capture']:>9.2f} {m['passes']:>8.3f} {m['inner']:>8.2f}"
        print(f"{row['layers']:>6} {times}  {row['sites']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "note": "total includes Dynamo tracing",
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
