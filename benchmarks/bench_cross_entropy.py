"""pytest-benchmark: cross-entropy forward+backward (with and without label smoothing),
fusedopt on every usable backend against torch eager, torch.compile, Liger and apex.
The cases come from fusedopt.bench.cases; see benchmarks/conftest.py."""

OPS = ("cross_entropy",)


def test_cross_entropy(benchmark, bench_case, bench_candidate, run_bench):
    run_bench(benchmark, bench_case, bench_candidate)
