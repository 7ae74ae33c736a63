"""Terminal rendering for the `tilefuse` commands: exit codes, the error line, JSON output, tables, and the fusion
report, the I/O report and the compile check as tables.

Library code logs; the commands print only through these functions, which take the JSON-ready documents the
library returns (`FusionReport.to_dict()`, `IOSiteReport`, `CompileResult`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console, JustifyMethod, OverflowMethod
from rich.markup import escape
from rich.table import Table

from .report import FusionReport

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Spec fields worth a glance in the table, per site kind; the JSON output has them all.
_SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "attention": (
        "q_len",
        "kv_len",
        "head_dim",
        "gqa_group",
        "causal",
        "align",
        "window",
        "softcap",
        "alibi",
        "sinks",
        "mask",
        "dropout_p",
        "rope",
        "source",
    ),
    "rmsnorm": ("width", "eps", "weight_offset", "residual"),
    "layernorm": ("width", "eps", "has_weight", "has_bias", "residual"),
    "rope": ("layout", "rotary_dim", "head_dim"),
}
# Values that say nothing special, left out of the table.
_UNREMARKABLE: dict[str, Any] = {
    "gqa_group": 1,
    "align": "top_left",
    "mask": "none",
    "dropout_p": 0.0,
    "weight_offset": 0.0,
    "source": "matmul",
    "has_weight": True,
}


# ------------------------------------------------------------------------------------------------ primitives


def fail(message: str, code: int) -> int:
    """Print `error: message` to stderr; returns `code`, the command's exit code."""
    Console(stderr=True).print(f"[red]error:[/] {escape(message)}", highlight=False)
    return code


def print_json(document: Any, indent: int = 2, default: Callable[[Any], Any] | None = None) -> None:
    """A command's result as JSON on stdout (`--json`)."""
    print(json.dumps(document, indent=indent, default=default))


def new_table(
    title: str, columns: Iterable[str], justify: JustifyMethod = "left", overflow: OverflowMethod = "ellipsis"
) -> Table:
    """A rich table with these columns, all justified and wrapped the same way."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify=justify, overflow=overflow)
    return table


def format_config(config: dict[str, int] | None, kind: str = "attention") -> str:
    """A config as the knobs its kernel family reads (the others stay at their defaults)."""
    if not config:
        return "-"
    warps, splits = f"w{config['num_warps']}", config.get("num_splits") or "auto"
    if kind == "attention_decode":
        return f"n{config['block_n']} {warps} s{config['num_stages']} splits {splits}"
    if kind == "norm":
        return warps
    if kind == "norm_backward":
        return f"{warps} programs {splits}"
    if kind == "rope":
        return f"rows {config['block_m']} {warps}"
    return f"{config['block_m']}x{config['block_n']} {warps} s{config['num_stages']}"


def format_us(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


# ------------------------------------------------------------------------------------------------ fusion report


def _format_value(value: Any) -> str:
    if isinstance(value, Mapping) and value.get("kind") == "rope":
        return f"{value.get('layout')}/{value.get('rotary_dim')}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def spec_summary(kind: str, spec: Mapping[str, Any] | None) -> str:
    """A short `key=value` line of the spec fields that say what is special about a site."""
    if not spec:
        return ""
    keys = [key for key in _SPEC_FIELDS.get(kind, tuple(spec)) if key in spec]
    shown = [
        f"{key}={_format_value(spec[key])}"
        for key in keys
        if spec[key] not in (None, False) and spec[key] != _UNREMARKABLE.get(key)
    ]
    return " ".join(shown)


def sites_table(report: FusionReport, title: str) -> Table:
    """The fusion report as a table: one row per candidate site."""
    table = new_table(title, ("#", "kind", "status", "node", "reason / spec"), overflow="fold")
    for index, site in enumerate(site.to_dict() for site in report.sites):
        fused = site["status"] == "fused"
        status = f"[green]{site['status']}[/]" if fused else f"[yellow]{site['status']}[/]"
        details = spec_summary(site["kind"], site["spec"]) if fused else str(site["reason"])
        table.add_row(str(index), site["kind"], status, escape(site["node"]), escape(details))
    return table


def summary_line(summary: Mapping[str, Any]) -> str:
    """'attention: 2 fused, 0 declined · rmsnorm: ...' from `FusionReport.summary()`."""
    parts = []
    for kind, counts in summary.items():
        if isinstance(counts, Mapping):
            parts.append(f"{kind}: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
        else:
            parts.append(f"{kind}: {counts}")
    return " · ".join(parts) if parts else "no candidate sites"


def render_report(console: Console, report: FusionReport, title: str) -> None:
    """The sites table, the summary line and every fallback of a FusionReport."""
    console.print(sites_table(report, title))
    console.print(summary_line(report.summary()))
    for why in getattr(report, "fallbacks", []):
        console.print(f"[yellow]fell back to the unfused graph:[/] {escape(why)}")


# ------------------------------------------------------------------------------------------------ kernels


def io_table(rows: Sequence[Any], title: str) -> Table:
    """`tilefuse io-report`: HBM bytes per fused site (codegen.io_report rows)."""
    columns = ("site", "kind", "fused", "unfused (est.)", "unfused / fused", "fused / lower bound")
    table = new_table(title, columns, justify="right")
    for r in rows:
        saving = f"{r.unfused_bytes / r.fused_bytes:.1f}x" if r.unfused_bytes else "-"
        bound = f"{r.fused_bytes / r.lower_bound_bytes:.2f}" if r.lower_bound_bytes else "-"
        table.add_row(r.node, r.kind, f"{r.fused_bytes:,}", f"{r.unfused_bytes or 0:,}", saving, bound)
    return table


def compile_check_table(results: Sequence[Any], arch: str) -> Table:
    """`tilefuse compile-check`: registers, spills, shared memory and, one row per loop, its instruction mix (SASS
    instructions per warp and iteration, HGMMA/HMMA, MUFU, LDGSTS/UTMALDG+UTMASTG, barriers) and density (warp
    instructions per MFLOP of tensor-core work; `compile_check.LoopMix`)."""
    columns = ("kernel", "ok", "config", "regs", "spill", "shared", "loop", "SASS", "hgmma/hmma", "mufu",
               "cp.async/tma", "barriers", "instr/MFLOP", "error")  # fmt: skip
    table = new_table(f"tilefuse kernels compiled for {arch} (no GPU needed)", columns)
    for r in results:
        head = (r.name, "yes" if r.ok else "[red]no[/]", _kernel_config(r), str(r.registers), str(r.spill_bytes),
                str(r.shared_bytes))  # fmt: skip
        rows = [_loop_cells(loop) for loop in r.loops] or [("-",) * 7]
        for i, cells in enumerate(rows):
            table.add_row(*(head if i == 0 else ("",) * len(head)), *cells, escape(r.error or "") if i == 0 else "")
    return table


def _kernel_config(result: Any) -> str:
    """The config of a compile-check result as "BLOCK_MxBLOCK_N w<warps> s<stages> d<head dim>", "-" without."""
    c = getattr(result, "config", None)
    if not c:
        return "-"
    head_dim = f" d{result.head_dim}" if result.head_dim else ""
    return f"{c['block_m']}x{c['block_n']} w{c['num_warps']} s{c['num_stages']}{head_dim}"


def _loop_cells(loop: Any) -> tuple[str, ...]:
    """The table cells of one `LoopMix`."""
    density = f"{loop.density:.0f}" if loop.density is not None else "-"
    return (loop.kind, str(loop.instructions), f"{loop.hgmma}/{loop.hmma}", str(loop.mufu),
            f"{loop.cp_async}/{loop.tma}", str(loop.barriers), density)  # fmt: skip
