"""Results of a benchmark run: rows, the tables, the JSON document and the speed-up plot.

The JSON fields are documented in docs/benchmarks.md; `SCHEMA` changes when they do.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field

import torch

from fusedopt.bench.console import make_table, markup_escape as escape
from fusedopt.bench.cases import GEMM_FLOOR, TORCH_CHUNKED

SCHEMA = "fusedopt-bench/1"


@dataclass
class Row:
    op: str
    case: str                   # op + variant, e.g. "cross_entropy ls=0.1"
    shape: str
    dtype: str
    device: str
    candidate: str
    kind: str                   # "fusedopt" | "baseline"
    backend: str | None         # fusedopt backend name
    metric: str                 # "device_time" | "host_time"
    time_ms: float              # median over samples
    time_ms_min: float
    time_ms_max: float
    samples: int
    runs_per_sample: int
    bytes: int | None           # per call, from the op's byte model
    byte_model: str
    gbps: float | None
    pct_copy_bw: float | None
    peak_mem_bytes: int | None  # extra bytes of one call; None when not measurable
    speedup: dict[str, float] = field(default_factory=dict)   # baseline -> its time / ours


def make_rows(case, timings: dict, peaks: dict, copy_bw: float | None) -> list[Row]:
    """Rows of one case from its timings (name -> timing.Timing), with the speed-up of every
    candidate over every baseline of the case (other than itself)."""
    rows = []
    by_name = {c.name: c for c in case.candidates}
    for name, timing in timings.items():
        cand = by_name[name]
        gbps = None if case.bytes_per_run is None else case.bytes_per_run / timing.median_s / 1e9
        pct = None if gbps is None or not copy_bw else 100.0 * gbps * 1e9 / copy_bw
        rows.append(Row(case.op, case.label, case.shape, case.dtype_name, case.device.type, name,
                        cand.kind, cand.backend, case.metric, timing.median_s * 1e3,
                        timing.min_s * 1e3, timing.max_s * 1e3, timing.samples,
                        timing.runs_per_sample, case.bytes_per_run, case.byte_model, gbps, pct,
                        peaks.get(name)))
    for row in rows:
        for base in rows:
            if base.kind == "baseline" and base is not row:
                row.speedup[base.candidate] = base.time_ms / row.time_ms
    return rows


# ----------------------------------------------------------------------------- SPEC §5 targets

# (device type, case label, fusedopt backends, measure, baseline or None, goal, text)
# measure "speedup": speed-up over the baseline; "pct_copy": % of copy bandwidth;
# "mem_saving": the baseline's peak memory / ours.  Met when the value >= goal.
_GPU = ("triton", "cuda")
TARGETS = [
    ("cpu", "adamw", ("cpu",), "speedup", "torch AdamW(foreach)", 5.0,
     "AdamW step >= 5x AdamW(foreach)"),
    ("cpu", "cross_entropy", ("cpu",), "speedup", "torch eager", 4.0,
     "cross-entropy fwd+bwd >= 4x torch"),
    ("cuda", "cross_entropy", _GPU, "pct_copy", None, 85.0,
     "cross-entropy >= 85% of copy bandwidth"),
    ("cuda", "cross_entropy", _GPU, "speedup", "torch eager", 2.5,
     "cross-entropy >= 2.5x torch eager"),
    ("cuda", "cross_entropy", _GPU, "speedup", "torch.compile", 1.3,
     "cross-entropy >= 1.3x torch.compile"),
    ("cuda", "cross_entropy", _GPU, "speedup", "liger", 1.1,
     "cross-entropy >= 1.1x Liger-Kernel"),
    ("cuda", "adamw_amp_clip", _GPU, "pct_copy", None, 85.0,
     "AdamW + unscale + clip >= 85% of copy bandwidth"),
    ("cuda", "adamw_amp_clip", _GPU, "speedup", "torch amp+clip+AdamW(fused)", 1.4,
     "AdamW + unscale + clip >= 1.4x the torch pipeline"),
    ("cuda", "step_host", _GPU, "speedup", "torch AdamW(fused)", 1.0,
     "step() host time <= AdamW(fused)"),
    ("cpu", "linear_cross_entropy", ("cpu",), "speedup", GEMM_FLOOR, 1 / 1.1,
     "linear CE time <= 1.1x its 3 GEMMs (their time / ours >= 0.91)"),
    ("cpu", "linear_cross_entropy", ("cpu",), "speedup", TORCH_CHUNKED, 1.0,
     "linear CE ahead of torch chunked"),
    ("cpu", "linear_cross_entropy", ("cpu",), "mem_saving", TORCH_CHUNKED, 1.0,
     "linear CE peak memory <= torch chunked's"),
    ("cuda", "linear_cross_entropy", _GPU, "speedup", "liger", 1.1,
     "linear CE >= 1.1x Liger-Kernel"),
    ("cuda", "linear_cross_entropy", _GPU, "mem_saving", "liger", 1.0,
     "linear CE peak memory <= Liger-Kernel's"),
]


def _mem_saving(row: Row, rows: list[Row], base: str) -> float | None:
    """The baseline's peak memory / this row's, from the baseline's row of the same case."""
    for other in rows:
        if (other.candidate, other.case, other.shape, other.dtype, other.device) == (
                base, row.case, row.shape, row.dtype, row.device):
            if other.peak_mem_bytes is not None and row.peak_mem_bytes:
                return other.peak_mem_bytes / row.peak_mem_bytes
    return None


def targets(rows: list[Row]) -> list[dict]:
    """SPEC §5 performance targets met or not, for every row they apply to."""
    out = []
    for device, case, backends_, measure, base, goal, text in TARGETS:
        for row in rows:
            if (row.device, row.case, row.kind) != (device, case, "fusedopt"):
                continue
            if row.backend not in backends_:
                continue
            if measure == "mem_saving":
                value = _mem_saving(row, rows, base)
            else:
                value = row.pct_copy_bw if measure == "pct_copy" else row.speedup.get(base)
            if value is None:
                continue
            out.append({"target": text, "case": row.case, "shape": row.shape,
                        "dtype": row.dtype, "candidate": row.candidate, "value": value,
                        "goal": goal, "met": value >= goal})
    return out


def targets_table(results: list[dict]):
    tab = make_table("[bold]SPEC §5 targets[/bold]", title_justify="left", header_style="bold")
    for col in ("target", "shape", "candidate", "measured", "met"):
        tab.add_column(col, overflow="fold")
    for t in results:
        unit = "%" if "%" in t["target"] else "x"
        tab.add_row(t["target"], f"{t['shape']} {t['dtype']}", escape(t["candidate"]),
                    f"{t['value']:.2f}{unit}",
                    "[green]yes[/green]" if t["met"] else "[red]no[/red]")
    return tab


# ----------------------------------------------------------------------------- environment

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, copy_bw: float | None) -> tuple[dict, dict]:
    """(versions, device description) for the JSON document and the header."""
    import fusedopt

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    versions = {"fusedopt": fusedopt.__version__, "torch": torch.__version__,
                "triton": triton_version, "python": platform.python_version(),
                "cuda": torch.version.cuda}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    dev = {"type": device.type, "name": gpu or cpu_name(), "cpu": cpu_name(), "gpu": gpu,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "copy_bandwidth_gbs": None if copy_bw is None else copy_bw / 1e9,
           "backends": {name: {"ok": ok, "reason": reason}
                        for name, (ok, reason) in fusedopt.backends.available().items()}}
    return versions, dev


def document(argv, versions, device, settings: dict, rows, skipped, errors, notes) -> dict:
    rows = list(rows)
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m fusedopt bench", *argv]),
        "versions": versions,
        "device": device,
        "settings": settings,
        "rows": [asdict(r) for r in rows],
        "targets": targets(rows),
        "skipped": skipped,
        "errors": errors,
        "notes": notes,
    }


def write_json(path: str, doc: dict) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------- table

def _fmt_time(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1e3:.3g} s"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms * 1e3:.3g} us"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _fmt_speedup(row: Row, base: str) -> str:
    if base not in row.speedup:
        return "-"
    x = row.speedup[base]
    if row.kind != "fusedopt":
        return f"{x:.2f}x"
    color = "green" if x >= 1 else "red"
    return f"[{color}]{x:.2f}x[/{color}]"


def group_rows(rows: list[Row]) -> list[list[Row]]:
    """Rows split per case (op variant, shape, dtype), in their order."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.case, row.shape, row.dtype), []).append(row)
    return list(groups.values())


def case_table(rows: list[Row]):
    """One table per case: a row per candidate, a speed-up column per baseline."""
    first = rows[0]
    gbps_note = "" if first.bytes is None else f"; bytes: {first.byte_model}"
    title = f"[bold]{first.case}[/bold]  {first.shape}  {first.dtype}{gbps_note}"
    tab = make_table(title, title_justify="left", header_style="bold")
    bases = [r.candidate for r in rows if r.kind == "baseline"]
    time_col = "host time" if first.metric == "host_time" else "time"
    speedup_cols = [f"vs {escape(b)}" for b in bases]
    for col in ("candidate", time_col, "GB/s", "% copy", *speedup_cols, "peak mem"):
        tab.add_column(col, justify="left" if col == "candidate" else "right", overflow="fold")
    for row in rows:
        name = escape(row.candidate)
        tab.add_row(f"[bold]{name}[/bold]" if row.kind == "fusedopt" else name,
                    _fmt_time(row.time_ms), "-" if row.gbps is None else f"{row.gbps:.1f}",
                    "-" if row.pct_copy_bw is None else f"{row.pct_copy_bw:.0f}%",
                    *[_fmt_speedup(row, b) for b in bases], _fmt_bytes(row.peak_mem_bytes))
    return tab


def print_tables(console, rows: list[Row]) -> None:
    for group in group_rows(rows):
        console.print(case_table(group))


# ----------------------------------------------------------------------------- plot

def plot(path: str, rows: list[Row], title: str) -> str:
    """A PNG bar chart of every fusedopt candidate's speed-up over every baseline; returns
    what happened, for the console."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)"
    bars = [(f"{r.case} {r.shape} {r.dtype}: {r.candidate} vs {base}", x)
            for r in rows if r.kind == "fusedopt" for base, x in r.speedup.items()]
    if not bars:
        return f"no fusedopt result with a baseline to compare: no plot written to {path}"
    labels, values = zip(*bars)
    fig, ax = plt.subplots(figsize=(11, 0.8 + 0.32 * len(bars)))
    ypos = range(len(bars))
    # bars grow from 1x, right for a speed-up, left for a slow-down, on a log axis
    ax.barh(ypos, [v - 1.0 for v in values], left=1.0,
            color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_xscale("log")
    low, high = min(min(values), 1.0), max(max(values), 1.0)
    ax.set_xlim(low / 1.6, high * 1.6)
    ax.set_yticks(list(ypos), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up (baseline time / fusedopt time), log scale")
    ax.set_title(title, fontsize=9)
    for y, v in zip(ypos, values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"plot written to {path}"
