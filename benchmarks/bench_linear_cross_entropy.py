"""pytest-benchmark: fused linear cross-entropy forward+backward (gradients of the input and
the weight), fusedopt on every usable backend against F.linear + F.cross_entropy, torch's
chunked F.linear_cross_entropy, the three GEMMs alone and Liger. The cases come from
fusedopt.bench.cases; see benchmarks/conftest.py."""

OPS = ("linear_cross_entropy",)


def test_linear_cross_entropy(benchmark, bench_case, bench_candidate, run_bench):
    run_bench(benchmark, bench_case, bench_candidate)
