"""pytest-benchmark suite over the cases of fusedopt.bench.cases (the same cases as
`python -m fusedopt bench`): one benchmark per (case, candidate), grouped per op, dtype
and shape, with the op's GB/s in ``extra_info``.

Run: ``pytest benchmarks/`` (files are named bench_*.py and collected by this conftest).
Sizes: ``FUSEDOPT_BENCH_SIZES=tiny|quick|full`` (default quick). CPU cases always run;
the CUDA cases are listed everywhere and skipped with the reason when there is no GPU.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from fusedopt.bench import cases as bench_cases
from fusedopt.bench.baselines import Skip
from fusedopt.bench.timing import HOST_TIME, synchronize

SIZES = os.environ.get("FUSEDOPT_BENCH_SIZES", "quick")
HOST_TIME_ROUNDS = 50


def pytest_collect_file(file_path, parent):
    # bench_*.py are not test_*.py: collect them here, unless named on the command line
    # (then pytest collects them itself).
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=]+", "-", text).strip("-")


def pytest_generate_tests(metafunc):
    """Parametrize ``bench_case, bench_candidate`` with the cases of the module's OPS."""
    if "bench_case" not in metafunc.fixturenames:
        return
    params = []
    for device in (torch.device("cpu"), torch.device("cuda")):
        no_gpu = device.type == "cuda" and not torch.cuda.is_available()
        no_gpu_skip = pytest.mark.skip(reason="GPU case: needs a CUDA device, none here")
        device_marks = [no_gpu_skip] if no_gpu else []
        for case in bench_cases.build_cases(device, SIZES, metafunc.module.OPS):
            for cand in case.candidates:
                params.append(pytest.param(case, cand, marks=device_marks,
                                           id=f"{device.type}-{case.ident}-{_ident(cand.name)}"))
            for name, reason in case.skipped:
                skip = pytest.mark.skip(reason=f"{name}: {reason}")
                params.append(pytest.param(case, None, marks=[skip],
                                           id=f"{device.type}-{case.ident}-{_ident(name)}"))
    metafunc.parametrize(("bench_case", "bench_candidate"), params)


class _CurrentCase:
    """Keeps the inputs of one case alive across its candidates; frees the previous case's."""

    def __init__(self):
        self.case = None

    def inputs(self, case):
        if self.case is not case:
            if self.case is not None:
                self.case.release()
            self.case = case
        return case.inputs()


@pytest.fixture(scope="session")
def _current_case():
    current = _CurrentCase()
    yield current
    if current.case is not None:
        current.case.release()


@pytest.fixture
def run_bench(_current_case):
    """``run_bench(benchmark, case, candidate)``: build the candidate (skip with the reason
    when it cannot run here), benchmark it, and record GB/s in extra_info."""

    def run(benchmark, case, candidate):
        try:
            fn = candidate.build(_current_case.inputs(case))
        except Skip as skip:
            pytest.skip(f"{candidate.name}: {skip}")
        device = case.device
        benchmark.group = f"{case.group} | {device.type}"
        benchmark.extra_info.update(
            op=case.op, case=case.label, shape=case.shape, dtype=case.dtype_name,
            device=device.type, candidate=candidate.name, kind=candidate.kind,
            backend=candidate.backend, metric=case.metric, bytes=case.bytes_per_run,
            byte_model=case.byte_model)
        if case.metric == HOST_TIME:  # time the call only; the device drains outside it
            benchmark.pedantic(fn, setup=lambda: synchronize(device), rounds=HOST_TIME_ROUNDS,
                               warmup_rounds=2)
        elif device.type == "cuda":
            benchmark(lambda: (fn(), synchronize(device)))
        else:
            benchmark(fn)
        if benchmark.stats is not None and case.bytes_per_run:
            median = benchmark.stats.stats.median
            benchmark.extra_info["gbps"] = case.bytes_per_run / median / 1e9

    return run
