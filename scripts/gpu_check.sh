#!/usr/bin/env bash
# The GPU run of fusedopt, for a machine with a CUDA device (none of our development
# machines has one). From the repository root:
#
#   bash scripts/gpu_check.sh [VENV]        (default VENV: .gpu-venv)
#
# 1. venv + install with FUSEDOPT_BUILD_CUDA=1 (a missing nvcc is an error) and the test
#    extras; torch comes from $TORCH (default torch==2.13.0 -- on a GPU machine pick the
#    CUDA build, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130").
# 2. the whole test suite on the GPU (every backend, `gpu` tests included), then the
#    `gpu`-marked tests alone, so a failure there is easy to see.
# 3. compute-sanitizer memcheck + racecheck over the cuda backend's tests (out-of-bounds
#    accesses and shared-memory races in the CUDA C++ kernels), when it is installed.
# 4. the full benchmark, JSON + plot under benchmarks/results/, named after the GPU.
#
# Logs of every step go to $OUT_DIR (default gpu-check/); the script stops at the first
# failing step and says which.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.gpu-venv}
TORCH=${TORCH:-torch==2.13.0}
OUT_DIR=${OUT_DIR:-gpu-check}
mkdir -p "$OUT_DIR" benchmarks/results

step() { echo "== $1"; }

step "install ($TORCH)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH
FUSEDOPT_BUILD_CUDA=1 "$VENV/bin/python" -m pip install -q ".[test,plot]"
PY="$(pwd)/$VENV/bin/python"
# from outside the checkout, so the installed package (with its extensions) is imported
(cd / && "$PY" -m fusedopt info) | tee "$OUT_DIR/info.txt"
(cd / && "$PY" -c "import torch, sys
sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')")

step "whole test suite on the GPU"
"$PY" -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest-all.txt"
step "gpu-marked tests"
"$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest-gpu.txt"

if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck synccheck; do
        step "compute-sanitizer --tool $tool (cuda backend tests)"
        # the 2^20-row grid-stride case is left to the plain run (too slow instrumented)
        compute-sanitizer --tool "$tool" --error-exitcode 1 \
            "$PY" -m pytest -q -x -m gpu -p no:cacheprovider -k "not more_rows_than_blocks" \
            tests/backends/test_cuda_losses.py tests/backends/test_cuda_focal.py \
            tests/backends/test_cuda_optim.py 2>&1 | tee "$OUT_DIR/sanitizer-$tool.txt"
    done
else
    echo "compute-sanitizer not on PATH: sanitizer runs left out" | tee "$OUT_DIR/sanitizer.txt"
fi

step "full benchmark"
name=$("$PY" -c "import torch, re
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
(cd / && "$PY" -m fusedopt bench --json "$OLDPWD/benchmarks/results/$name-full.json" \
    --plot "$OLDPWD/benchmarks/results/$name-full.png") 2>&1 | tee "$OUT_DIR/bench.txt"
echo "== done: logs in $OUT_DIR/, results in benchmarks/results/$name-full.json"
