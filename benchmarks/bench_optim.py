"""pytest-benchmark: one optimizer step (Adam, AdamW, AdamW with bf16 / 8-bit states, SGD with
momentum, AdamW with loss scaling and global-norm clipping) and the host time of step() on
1,000 small tensors, fusedopt on every usable backend against torch.optim (foreach and fused),
apex, DeepSpeed's CPUAdam, torchao's and bitsandbytes' 8-bit AdamW.
The cases come from fusedopt.bench.cases; see benchmarks/conftest.py."""

OPS = ("adam", "adamw", "adamw_bf16", "adamw_int8", "sgd", "adamw_amp_clip", "step_host")


def test_optimizer_step(benchmark, bench_case, bench_candidate, run_bench):
    run_bench(benchmark, bench_case, bench_candidate)
