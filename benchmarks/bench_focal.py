"""pytest-benchmark: softmax focal and sigmoid focal losses, forward+backward, fusedopt on
every usable backend against torch-ops formulas, eager and compiled.
The cases come from fusedopt.bench.cases; see benchmarks/conftest.py."""

OPS = ("focal_loss", "sigmoid_focal_loss")


def test_focal(benchmark, bench_case, bench_candidate, run_bench):
    run_bench(benchmark, bench_case, bench_candidate)
