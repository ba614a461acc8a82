"""pytest-benchmark: one optimizer step (Adam, AdamW, SGD with momentum, AdamW with loss
scaling and global-norm clipping) and the host time of step() on 1,000 small tensors,
fusedopt on every usable backend against torch.optim (foreach and fused) and apex.
The cases come from fusedopt.bench.cases; see benchmarks/conftest.py."""

OPS = ("adam", "adamw", "sgd", "adamw_amp_clip", "step_host")


def test_optimizer_step(benchmark, bench_case, bench_candidate, run_bench):
    run_bench(benchmark, bench_case, bench_candidate)
