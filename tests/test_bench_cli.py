"""`python -m fusedopt bench`: end to end on CPU with tiny sizes, the JSON fields documented
in docs/benchmarks.md, and the pieces (interleaving, byte models, speed-ups, skips, errors)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fusedopt.bench import cases, cli, report, timing
from fusedopt.bench.baselines import Skip

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "benchmarks.md").read_text()


def _documented(section: str) -> set[str]:
    """Field names in the first column of the markdown table under ``### <section>``."""
    body = DOC.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)`", body, flags=re.M))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole command, as a user runs it, at tiny sizes on CPU."""
    out = tmp_path_factory.mktemp("bench")
    # one thread: this checks what the command does, not how fast; two OpenMP threads on a
    # 2-core machine shared with other work can stall each other for orders of magnitude
    env = {**os.environ, "FUSEDOPT_BENCH_TINY": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    # from outside the checkout, so that the package under test (installed, or on
    # PYTHONPATH) is imported, not the source tree without its extensions
    proc = subprocess.run(
        [sys.executable, "-m", "fusedopt", "bench", "--json", str(out / "r.json"),
         "--plot", str(out / "p.png")],
        cwd=out, env=env, capture_output=True, text=True, timeout=240)
    doc = json.loads((out / "r.json").read_text()) if (out / "r.json").exists() else None
    return proc, doc, out


def test_cli_runs_end_to_end_and_prints_the_table(tiny_run):
    proc, doc, _ = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for header in ("candidate", "time", "GB/s", "% copy", "peak mem", "vs torch eager",
                   "vs torch AdamW(fused)"):
        assert header in text, header
    for op in cases.OPS:
        assert op in text, op
    assert "fusedopt[torch]" in text
    assert "results written to" in text


def test_json_has_the_documented_fields(tiny_run):
    _, doc, _ = tiny_run
    assert doc is not None
    assert set(doc) == _documented("Top level")
    assert set(doc["device"]) == _documented("device")
    assert set(doc["versions"]) == _documented("versions")
    assert doc["rows"] and all(set(row) == _documented("rows") for row in doc["rows"])
    assert doc["schema"] == report.SCHEMA
    assert doc["device"]["type"] == "cpu" and doc["device"]["gpu"] is None
    assert doc["device"]["copy_bandwidth_gbs"] > 0
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["command"].startswith("python -m fusedopt bench")
    assert doc["settings"]["sizes"] == "tiny"
    assert doc["errors"] == []


def test_json_rows_cover_every_op_with_fusedopt_and_baselines(tiny_run):
    _, doc, _ = tiny_run
    rows = doc["rows"]
    assert {r["op"] for r in rows} == set(cases.OPS)
    labels = {r["case"] for r in rows}
    assert {"cross_entropy", f"cross_entropy ls={cases.LABEL_SMOOTHING:g}"} <= labels
    for op in cases.OPS:
        kinds = {r["kind"] for r in rows if r["op"] == op}
        assert kinds == {"fusedopt", "baseline"}, op
    names = {r["candidate"] for r in rows}
    assert {"torch eager", "torch AdamW(foreach)", "torch AdamW(fused)", "torch SGD(fused)",
            "torch amp+clip+AdamW(fused)"} <= names
    # torch.compile either ran or was skipped with a reason
    skipped = {(s["candidate"], s["reason"]) for s in doc["skipped"]}
    assert "torch.compile" in names or any(c == "torch.compile" and r for c, r in skipped)


def test_json_numbers_are_consistent(tiny_run):
    _, doc, _ = tiny_run
    copy_gbs = doc["device"]["copy_bandwidth_gbs"]
    for row in doc["rows"]:
        assert 0 < row["time_ms_min"] <= row["time_ms"] <= row["time_ms_max"]
        assert row["samples"] >= 2 and row["runs_per_sample"] >= 1
        assert row["peak_mem_bytes"] >= 0  # the profiler's record of CPU allocations
        if row["op"] == "step_host":
            assert row["metric"] == "host_time" and row["bytes"] is None and row["gbps"] is None
            continue
        if row["op"] == "linear_cross_entropy":  # GEMM-bound: no byte model
            assert row["bytes"] is None and row["gbps"] is None and row["pct_copy_bw"] is None
        else:
            assert row["gbps"] == pytest.approx(row["bytes"] / (row["time_ms"] / 1e3) / 1e9)
            assert row["pct_copy_bw"] == pytest.approx(100 * row["gbps"] / copy_gbs)
        key = (row["case"], row["shape"])
        same_case = [r for r in doc["rows"] if (r["case"], r["shape"]) == key]
        baselines = {r["candidate"]: r["time_ms"] for r in same_case if r["kind"] == "baseline"}
        expected = {b: t / row["time_ms"] for b, t in baselines.items() if b != row["candidate"]}
        assert row["speedup"] == pytest.approx(expected)


def test_missing_libraries_are_skipped_with_a_reason(tiny_run):
    proc, doc, out = tiny_run
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert any(s["candidate"] == "liger" and "not installed" in s["reason"]
                   for s in doc["skipped"])
        assert "liger" in proc.stdout and "not installed" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout
        assert not (out / "p.png").exists()
    else:
        assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- pieces


def test_measure_interleaves_candidates_round_robin():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in "abc"}
    settings = timing.Settings(warmup=0, rounds=3, min_rounds=3, budget_s=0.0, target_sample_s=0.0)
    result = timing.measure(fns, torch.device("cpu"), settings=settings)
    timed = order[3:]  # after one calibration call each
    assert timed == list("abc" "bca" "cab")
    assert all(t.samples == 3 and t.runs_per_sample == 1 for t in result.values())
    assert all(t.min_s <= t.median_s <= t.max_s for t in result.values())


def test_byte_models():
    ce = cases.build_cases("cpu", "tiny", ["cross_entropy"])
    rows, classes = cases.SIZES["cpu"]["tiny"]["loss"][0]
    assert [c.label for c in ce] == ["cross_entropy", "cross_entropy ls=0.1"]
    assert all(c.bytes_per_run == 3 * rows * classes * 4 for c in ce)
    for op, per_param in (("adam", 28), ("adamw", 28), ("sgd", 20), ("adamw_amp_clip", 32)):
        (case,) = cases.build_cases("cpu", "tiny", [op])
        n_params = sum(p.numel() for p in case.inputs()["params"])
        assert case.bytes_per_run == per_param * n_params, op
        case.release()
    (linear,) = cases.build_cases("cpu", "tiny", ["linear_cross_entropy"])
    assert linear.bytes_per_run is None
    assert {cases.GEMM_FLOOR, cases.TORCH_CHUNKED, "torch eager", "liger"} <= {
        c.name for c in linear.candidates}
    (host,) = cases.build_cases("cpu", "tiny", ["step_host"])
    assert host.bytes_per_run is None and host.metric == timing.HOST_TIME
    assert len(cases.host_model_shapes(1000)) == 1000


@pytest.mark.parametrize("total", [100_000, 5_000_000, 75_000_000, 1_000_000_000])
def test_model_shapes_add_up_to_the_requested_size(total):
    shapes = cases.model_shapes(total)
    n = sum(math.prod(s) for s in shapes)
    d = shapes[-1][0]
    assert total - d < n <= total


def test_triton_is_not_benchmarked_under_the_interpreter(monkeypatch):
    usable = {"triton", "cpu", "torch"}
    monkeypatch.setattr(cases.backends, "_usable", lambda name, op, device: (
        (True, "") if name in usable else (False, f"{name} cannot run here")))
    names, left_out = cases.fusedopt_backends("cross_entropy", torch.device("cpu"), None)
    assert names == ["cpu", "torch"]
    reasons = dict(left_out)
    assert "interpreter" in reasons["fusedopt[triton]"]
    assert reasons["fusedopt[cuda]"] == "cuda cannot run here"


def test_every_backend_left_out_is_listed_with_its_reason():
    names, left_out = cases.fusedopt_backends("adamw", torch.device("cpu"), None)
    listed = names + [cand.removeprefix("fusedopt[").removesuffix("]") for cand, _ in left_out]
    assert sorted(listed) == sorted(cases.backends.NAMES)
    assert all(reason for _, reason in left_out)


def test_backend_filter_reports_an_unusable_backend():
    (case,) = cases.build_cases("cpu", "tiny", ["adamw"], backend="cuda")
    assert [c.kind for c in case.candidates].count("fusedopt") == 0
    assert any(name == "fusedopt[cuda]" and "cuda" in reason.lower() for name, reason in case.skipped)
    (case,) = cases.build_cases("cpu", "tiny", ["adamw"], backend="torch")
    assert [c.name for c in case.candidates if c.kind == "fusedopt"] == ["fusedopt[torch]"]


def test_a_failing_candidate_is_reported_and_sets_the_exit_status(monkeypatch, tmp_path, capsys):
    def broken(inputs):
        def run():
            raise RuntimeError("kernel exploded")
        return run

    def skipped(inputs):
        raise Skip("not here")

    def fake_cases(device, sizes, ops, backend, use_compile, **shape_options):
        case = cases.Case("cross_entropy", "cross_entropy", "4x8", torch.float32,
                          torch.device("cpu"), 3 * 4 * 8 * 4, "model",
                          lambda: {"x": torch.ones(4, 8)})
        case.candidates = [cases.Candidate("fusedopt[torch]", cases.FUSEDOPT, broken, "torch"),
                           cases.Candidate("torch eager", cases.BASELINE, lambda inp: inp["x"].sum),
                           cases.Candidate("liger", cases.BASELINE, skipped)]
        return [case]

    monkeypatch.setattr(cli.cases_mod, "build_cases", fake_cases)
    path = tmp_path / "r.json"
    assert cli.main(["--sizes", "tiny", "--json", str(path)]) == 1
    doc = json.loads(path.read_text())
    assert [r["candidate"] for r in doc["rows"]] == ["torch eager"]
    assert doc["errors"][0]["candidate"] == "fusedopt[torch]"
    assert "kernel exploded" in doc["errors"][0]["error"]
    assert doc["skipped"] == [
        {"case": "cross_entropy | float32 | 4x8", "candidate": "liger", "reason": "not here"}]
    assert "kernel exploded" in capsys.readouterr().out


def test_loss_shapes_and_smoothings_replace_the_size_sets():
    built = cases.build_cases("cpu", "tiny", ["cross_entropy", "focal_loss", "adamw_amp_clip"],
                              loss_shapes=[(8, 300), (4, 50)], smoothings=[0.0])
    assert [(c.label, c.shape) for c in built[:4]] == [
        ("cross_entropy", "8x300"), ("cross_entropy", "4x50"),
        ("focal_loss", "8x300"), ("focal_loss", "4x50")]
    assert [c.op for c in built[4:]] == ["adamw_amp_clip"]
    (smoothed,) = cases.build_cases("cpu", "tiny", ["cross_entropy"], smoothings=[0.2])
    assert smoothed.label == "cross_entropy ls=0.2"


def test_loss_shape_and_label_smoothing_options(monkeypatch, tmp_path, capsys):
    """The GPU check's quick benchmark: exactly cross-entropy 8192 x 128k without smoothing
    and the AdamW + AMP + clip pipeline."""
    seen = {}

    def fake_cases(device, sizes, ops, backend, use_compile, **shape_options):
        seen.update(shape_options, ops=ops)
        return []

    monkeypatch.setattr(cli.cases_mod, "build_cases", fake_cases)
    path = tmp_path / "r.json"
    assert cli.main(["--sizes", "tiny", "--op", "cross_entropy,adamw_amp_clip",
                     "--loss-shape", "8192x131072", "--label-smoothing", "0",
                     "--json", str(path)]) == 0
    assert seen == {"ops": ["cross_entropy", "adamw_amp_clip"],
                    "loss_shapes": [(8192, 131072)], "smoothings": [0.0]}
    settings = json.loads(path.read_text())["settings"]
    assert settings["loss_shapes"] == [[8192, 131072]] and settings["label_smoothing"] == [0.0]
    for bad in (["--loss-shape", "8192"], ["--loss-shape", "0x5"], ["--label-smoothing", "2"],
                ["--label-smoothing", "a"]):
        assert cli.main(["--sizes", "tiny", *bad]) == 2, bad
        assert bad[0] in capsys.readouterr().out


def test_without_rich_the_tables_are_plain_text(monkeypatch, capsys):
    """An offline GPU machine may have no rich: the bench prints the same tables as text."""
    from fusedopt.bench import console

    monkeypatch.setattr(console, "RICH", False)

    def fake_cases(device, sizes, ops, backend, use_compile, **shape_options):
        case = cases.Case("cross_entropy", "cross_entropy", "4x8", torch.float32,
                          torch.device("cpu"), 3 * 4 * 8 * 4, "model",
                          lambda: {"x": torch.ones(4, 8)})
        case.candidates = [
            cases.Candidate("fusedopt[torch]", cases.FUSEDOPT, lambda inp: inp["x"].exp, "torch"),
            cases.Candidate("torch eager", cases.BASELINE, lambda inp: inp["x"].sum)]
        return [case]

    monkeypatch.setattr(cli.cases_mod, "build_cases", fake_cases)
    assert cli.main(["--sizes", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "[bold" not in out and "[/" not in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("candidate"))
    assert header.split() == ["candidate", "time", "GB/s", "%", "copy", "vs", "torch", "eager",
                              "peak", "mem"]
    ours = next(line for line in lines if line.startswith("fusedopt[torch]"))
    assert ours.endswith(" B") and len(ours) == len(header)  # the CPU peak memory, in bytes


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    message = report.plot(str(tmp_path / "p.png"), [], "title")
    assert "matplotlib is not installed" in message
    assert not (tmp_path / "p.png").exists()


def test_bad_arguments(capsys):
    assert cli.main(["--op", "nope", "--sizes", "tiny"]) == 2
    assert "unknown op" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["--backend", "nope"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().out


def test_spec_targets_are_checked_on_the_matching_rows(tiny_run):
    def fake_case(label, candidates):
        case = cases.Case(label, label, "8x8", torch.float32, torch.device("cpu"), 1000,
                          "model", dict)
        case.candidates = candidates
        return case

    adamw = fake_case("adamw", [cases.Candidate("fusedopt[cpu]", cases.FUSEDOPT, None, "cpu"),
                                cases.Candidate("fusedopt[torch]", cases.FUSEDOPT, None, "torch"),
                                cases.Candidate("torch AdamW(foreach)", cases.BASELINE, None)])
    ms = {"fusedopt[cpu]": 1.0, "fusedopt[torch]": 0.5, "torch AdamW(foreach)": 6.0}
    timings = {k: timing.Timing(v / 1e3, v / 1e3, v / 1e3, 3, 1) for k, v in ms.items()}
    rows = report.make_rows(adamw, timings, {}, copy_bw=1e9)
    ce = fake_case("cross_entropy", [cases.Candidate("fusedopt[cpu]", cases.FUSEDOPT, None, "cpu"),
                                     cases.Candidate("torch eager", cases.BASELINE, None)])
    timings = {"fusedopt[cpu]": timing.Timing(1e-3, 1e-3, 1e-3, 3, 1),
               "torch eager": timing.Timing(3e-3, 3e-3, 3e-3, 3, 1)}
    rows += report.make_rows(ce, timings, {}, copy_bw=1e9)
    found = report.targets(rows)
    assert [(t["case"], t["candidate"], t["met"]) for t in found] == [
        ("adamw", "fusedopt[cpu]", True), ("cross_entropy", "fusedopt[cpu]", False)]
    assert found[0]["value"] == pytest.approx(6.0) and found[0]["goal"] == 5.0
    assert found[1]["value"] == pytest.approx(3.0) and found[1]["goal"] == 4.0
    _, doc, _ = tiny_run
    for t in doc["targets"]:
        assert t["met"] == (t["value"] >= t["goal"])


def test_cpu_peak_memory_follows_allocations():
    def allocate():
        a = torch.empty(1 << 20)          # 4 MiB
        b = torch.empty(1 << 19)          # 2 MiB
        del a
        c = torch.empty(3 << 20) + 1      # a 12 MiB temporary and a 12 MiB result
        del b, c

    peak = timing.cpu_peak_memory(allocate)
    assert peak is not None, "this torch's profiler records no CPU allocations"
    assert 26 << 20 <= peak <= (26 << 20) + 4096


def test_memory_target_compares_peaks():
    case = cases.Case("linear_cross_entropy", "linear_cross_entropy", "N8 H4 V16",
                      torch.float32, torch.device("cpu"), None, "model", dict)
    case.candidates = [cases.Candidate("fusedopt[cpu]", cases.FUSEDOPT, None, "cpu"),
                       cases.Candidate(cases.TORCH_CHUNKED, cases.BASELINE, None),
                       cases.Candidate(cases.GEMM_FLOOR, cases.BASELINE, None)]
    ms = {"fusedopt[cpu]": 1.05, cases.TORCH_CHUNKED: 1.5, cases.GEMM_FLOOR: 1.0}
    timings = {k: timing.Timing(v / 1e3, v / 1e3, v / 1e3, 3, 1) for k, v in ms.items()}
    peaks = {"fusedopt[cpu]": 300, cases.TORCH_CHUNKED: 200, cases.GEMM_FLOOR: 1000}
    found = {t["target"]: t for t in report.targets(report.make_rows(case, timings, peaks, None))}
    memory = [t for name, t in found.items() if "memory" in name]
    assert len(memory) == 1 and memory[0]["value"] == pytest.approx(200 / 300)
    assert not memory[0]["met"]
    floor = [t for name, t in found.items() if "3 GEMMs" in name]
    assert floor[0]["value"] == pytest.approx(1 / 1.05) and floor[0]["met"]
