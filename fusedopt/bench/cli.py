"""`python -m fusedopt bench`: every case of fusedopt.bench.cases on the present device.

For each case its candidates are built (a Skip is recorded with its reason), called once
(a failure is recorded as an error and makes the exit status 1), timed round-robin, and
their peak memory read (CUDA). Then a table (rich when installed, else plain text), and on
request a JSON document and a
PNG plot of the speed-ups. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

from fusedopt import backends
from fusedopt.bench import cases as cases_mod, report
from fusedopt.bench.baselines import Skip, first_line
from fusedopt.bench.console import make_console, make_progress
from fusedopt.bench.timing import Settings, copy_bandwidth, measure, peak_memory, synchronize

SETTINGS = {
    "full": Settings(warmup=3, rounds=20, min_rounds=5, budget_s=15.0, target_sample_s=0.05),
    "quick": Settings(warmup=2, rounds=7, min_rounds=3, budget_s=3.0, target_sample_s=0.02),
    "tiny": Settings(warmup=1, rounds=3, min_rounds=2, budget_s=0.3, target_sample_s=0.005),
}
COPY_BYTES = {  # size of each of the two tensors of the copy-bandwidth measurement
    "cpu": {"full": 256 * 2**20, "quick": 256 * 2**20, "tiny": 64 * 2**20},
    "cuda": {"full": 2 * 2**30, "quick": 2 * 2**30, "tiny": 64 * 2**20},
}
TINY_ENV = "FUSEDOPT_BENCH_TINY"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusedopt bench",
        description="Benchmark the fusedopt kernels on this device against PyTorch baselines "
                    "(see docs/benchmarks.md for the columns and byte models).")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few rounds (< 2 min on 2 CPU cores)")
    p.add_argument("--op", action="append", metavar="NAME",
                   help=f"only these ops (repeat or comma-separate): {', '.join(cases_mod.OPS)}")
    p.add_argument("--backend", choices=backends.NAMES,
                   help="only this fusedopt backend (baselines still run)")
    p.add_argument("--json", metavar="PATH", help="write every result and the environment as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="write a PNG bar chart of the speed-ups (needs matplotlib)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device to benchmark (default: cuda when available, else cpu)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile baselines")
    p.add_argument("--loss-shape", action="append", metavar="ROWSxCLASSES",
                   help="loss shapes instead of the size set's (repeat or comma-separate), "
                        "e.g. 8192x131072")
    p.add_argument("--label-smoothing", metavar="EPS[,EPS]",
                   help="cross-entropy label-smoothing variants "
                        f"(default: 0,{cases_mod.LABEL_SMOOTHING:g})")
    # Size set override, for the tests (tiny sizes run in seconds); also FUSEDOPT_BENCH_TINY=1.
    p.add_argument("--sizes", choices=cases_mod.SIZE_SETS, help=argparse.SUPPRESS)
    return p


def _ops(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    ops = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = [op for op in ops if op not in cases_mod.OPS]
    if unknown:
        raise ValueError(f"--op: unknown op(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(cases_mod.OPS)}")
    return ops


def _loss_shapes(values: list[str] | None) -> list[tuple[int, int]] | None:
    if not values:
        return None
    shapes = []
    for text in (name.strip() for value in values for name in value.split(",")):
        rows, sep, classes = text.lower().partition("x")
        if not (sep and rows.isdigit() and classes.isdigit() and min(int(rows), int(classes)) > 0):
            raise ValueError(f"--loss-shape: expected ROWSxCLASSES with positive integers "
                             f"(e.g. 8192x131072), got {text!r}")
        shapes.append((int(rows), int(classes)))
    return shapes


def _smoothings(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        eps = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        eps = []
    if not eps or not all(0.0 <= e <= 1.0 for e in eps):
        raise ValueError(f"--label-smoothing: expected values in [0, 1] separated by commas, "
                         f"got {value!r}")
    return eps


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _run_case(case, device, settings, copy_bw, skipped, errors, progress, task):
    """Rows of one case; skips and errors are appended to the given lists."""
    def record_error(name, exc):
        errors.append({"case": case.group, "candidate": name, "error": first_line(exc, 400)})

    progress.update(task, description=f"{case.label} {case.shape}: inputs")
    try:
        inputs = case.inputs()
    except Exception as exc:
        record_error("(inputs)", exc)
        return []
    runnable = {}
    for cand in case.candidates:
        progress.update(task, description=f"{case.label} {case.shape}: {cand.name}")
        try:
            fn = cand.build(inputs)
            fn()  # a broken candidate fails here, not inside the timing loop
            synchronize(device)
            runnable[cand.name] = fn
        except Skip as skip:
            skipped.append({"case": case.group, "candidate": cand.name, "reason": str(skip)})
        except Exception as exc:
            record_error(cand.name, exc)
    if not runnable:
        return []
    progress.update(task, description=f"{case.label} {case.shape}: timing")
    try:
        timings = measure(runnable, device, metric=case.metric, settings=settings)
        peaks = {name: peak_memory(fn, device) for name, fn in runnable.items()}
    except Exception as exc:
        record_error("(timing)", exc)
        return []
    return report.make_rows(case, timings, peaks, copy_bw)


def run(args, argv, console) -> int:
    sizes = args.sizes or ("tiny" if os.environ.get(TINY_ENV) == "1"
                           else "quick" if args.quick else "full")
    device = _device(args.device)
    ops = _ops(args.op)
    settings = SETTINGS[sizes]
    loss_shapes, smoothings = _loss_shapes(args.loss_shape), _smoothings(args.label_smoothing)
    cases = cases_mod.build_cases(device, sizes, ops, args.backend, use_compile=not args.no_compile,
                                  loss_shapes=loss_shapes, smoothings=smoothings)

    console.print(f"[bold]fusedopt bench[/bold]: sizes {sizes!r} on {device.type}; "
                  "measuring copy bandwidth ...")
    copy_bw = copy_bandwidth(device, COPY_BYTES[device.type][sizes], settings)
    versions, dev = report.environment(device, copy_bw)
    title = (f"fusedopt {versions['fusedopt']} on {dev['name']} ({dev['torch_threads']} threads), "
             f"torch {versions['torch']}, copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    console.print(title)

    rows, skipped, errors, notes = [], [], [], []
    load = _load_note()
    if load:
        notes.append(load)
        console.print(f"[yellow]{load}[/yellow]")
    with make_progress(console) as progress:
        task = progress.add_task("benchmarks", total=len(cases))
        for case in cases:
            skipped.extend({"case": case.group, "candidate": name, "reason": reason}
                           for name, reason in case.skipped)
            rows.extend(_run_case(case, device, settings, copy_bw, skipped, errors, progress, task))
            notes.extend(case.notes)  # after the run: some are measured by the candidates
            case.release()
            gc.collect()
            progress.advance(task)

    report.print_tables(console, rows)
    met = report.targets(rows)
    if met:
        console.print(report.targets_table(met))
    _print_list(console, "skipped", _merge_skips(skipped), "yellow")
    _print_list(console, "notes", notes, "cyan")
    _print_list(console, "errors",
                [f"{e['candidate']} ({e['case']}): {e['error']}" for e in errors], "red")
    if args.json:
        settings_doc = {"sizes": sizes, "ops": ops or list(cases_mod.OPS), "backend": args.backend,
                        "compile": not args.no_compile, "loss_shapes": loss_shapes,
                        "label_smoothing": smoothings, **vars(settings)}
        report.write_json(args.json, report.document(argv, versions, dev, settings_doc, rows,
                                                     skipped, errors, notes))
        console.print(f"results written to {args.json}")
    if args.plot:
        console.print(report.plot(args.plot, rows, title))
    return 1 if errors else 0


def _load_note() -> str | None:
    """A warning when the machine is already busy: other work skews CPU timings."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cpus = os.cpu_count() or 1
    if load <= 0.5 * cpus:
        return None
    return (f"load average {load:.2f} on {cpus} CPUs at the start: other work is running, "
            f"timings (CPU ones above all) may be disturbed")


def _merge_skips(skipped: list[dict]) -> list[str]:
    """One line per (candidate, reason), with the number of cases it applies to."""
    merged: dict[tuple[str, str], int] = {}
    for s in skipped:
        merged[(s["candidate"], s["reason"])] = merged.get((s["candidate"], s["reason"]), 0) + 1
    return [f"{cand}: {reason}" + (f" ({n} cases)" if n > 1 else "")
            for (cand, reason), n in merged.items()]


def _print_list(console, title: str, lines: list[str], color: str) -> None:
    if lines:
        console.print(f"[bold {color}]{title}:[/bold {color}]")
        for line in lines:
            console.print(f"  - {line}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse already printed it
        return int(exc.code or 0)
    console = make_console(width=None if sys.stdout.isatty() else 140)
    try:
        return run(args, argv, console)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
