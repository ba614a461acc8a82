#!/usr/bin/env bash
# The GPU validation of fusedopt (docs/gpu_validation.md): one command, offline, on the
# machine's own Python, PyTorch and Triton.  From anywhere:
#
#   bash scripts/gpu_check.sh --quick            # ~6 min on one H200, build included
#   bash scripts/gpu_check.sh                    # the rest: full suite, sanitizers, full bench
#   bash scripts/gpu_check.sh --only suite       # some steps only (comma-separated)
#   bash scripts/gpu_check.sh --quick --out DIR  # logs to DIR (default gpu-check/<gpu>-<mode>)
#
# PYTHON (default: python3 on PATH) is the interpreter.  Its packages are used as they are
# (torch, triton, pybind11, setuptools, pytest; rich and matplotlib when present): nothing
# is downloaded (PIP_NO_INDEX=1 is fine) and nothing is installed into that Python.
# fusedopt is built for the GPUs present only (FUSEDOPT_CUDA_ARCHS from torch or nvidia-smi,
# unless set), with every C++/CUDA source compiled in parallel, installed with
# `pip install --target` into build/gpu-check-site, and every step runs from that folder,
# so the installed package -- never the source tree -- is imported.
#
# Steps and their time caps (seconds; a step past its cap is stopped and reported):
#   --quick: build 150, info 30, gpu-tests 150, memcheck 90, bench-quick 120
#   default: build 150, info 30, suite 570, memcheck 420, racecheck 420, synccheck 300,
#            bench 590
# Every step runs even when an earlier one failed (except after a failed build); the
# verdicts and times are in DIR/summary.txt.  Exit status: 0 every step passed, 1 a step
# failed or timed out, 2 no CUDA device (after the build and `fusedopt info`), 3 bad usage.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
MODE=full
ONLY=""
OUT=""
usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --only) ONLY=${2:-}; shift ;;
        --out) OUT=${2:-}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 3 ;;
    esac
    shift
done
if [ "$MODE" = quick ]; then
    STEPS="build info gpu-tests memcheck bench-quick"
else
    STEPS="build info suite memcheck racecheck synccheck bench"
fi
if [ -n "$ONLY" ]; then
    for step in ${ONLY//,/ }; do
        case " $STEPS " in *" $step "*) ;; *)
            echo "gpu_check.sh: --only: '$step' is not a step of this mode ($STEPS)" >&2; exit 3 ;;
        esac
    done
    STEPS="build info ${ONLY//,/ }"  # always built (reused when up to date) and described
fi
declare -A CAP=([build]=150 [info]=30 [gpu-tests]=150 [memcheck]=90 [bench-quick]=120
                [suite]=570 [racecheck]=420 [synccheck]=300 [bench]=590)
[ "$MODE" = full ] && CAP[memcheck]=420

# The cuda tests under the sanitizers.  --quick: a subset that still reaches every kernel
# and memory path (row cache on and off, rows over 64 KB, misaligned and strided rows,
# vector and element optimizer paths, launch splits); the full run takes all of them but
# the 2^20-row grid-stride case (minutes when instrumented).
CUDA_TESTS=("$REPO/tests/backends/test_cuda_losses.py" "$REPO/tests/backends/test_cuda_focal.py"
            "$REPO/tests/backends/test_cuda_optim.py"
            "$REPO/tests/ops/test_vocab_parallel_kernels.py")
SANITIZER_SUBSET="(every_flag and 20001) or (vocab_sizes and (16384 or 128256))
    or (misaligned_rows and 40000) or strided_rows or out_of_range_targets
    or (test_focal_loss and 16385) or focal_strided or (test_sigmoid_focal_loss and 12293)
    or sigmoid_focal_misaligned or (scale_grad and 999) or adam_matches or sgd_matches
    or (misaligned_tensors and fp32) or many_tensors or (vocab_every_flag and ragged and WSZC)"
SANITIZER_ALL="not more_rows_than_blocks"

"$PY" - <<'EOF' || { echo "gpu_check.sh: $PY lacks what the build needs" >&2; exit 1; }
import importlib.util
import sys
missing = [m for m in ("torch", "setuptools", "pybind11", "pytest", "pip")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"{sys.executable}: missing {', '.join(missing)} (no network: install them first)")
EOF

# --------------------------------------------------------------------------- the GPU
read -r HAS_CUDA GPU_NAME ARCHS < <("$PY" - <<'EOF'
import re, subprocess, torch
if torch.cuda.is_available():
    n = torch.cuda.device_count()
    archs = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(n)})
    name = torch.cuda.get_device_name(0)
    print(1, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), ";".join(archs))
else:
    try:  # a GPU that this torch cannot use (CPU-only build): still build for it
        caps = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        caps = []
    archs = sorted({c.replace(".", "") for c in caps if re.fullmatch(r"\d+\.\d+", c)})
    print(0, "no-gpu", ";".join(archs) or "-")
EOF
)
if [ -z "${FUSEDOPT_CUDA_ARCHS:-}" ] && [ "$ARCHS" != "-" ]; then
    export FUSEDOPT_CUDA_ARCHS=$ARCHS
fi
if [ -z "${FUSEDOPT_CUDA_ARCHS:-}" ] && [ -z "${FUSEDOPT_BUILD_CUDA:-}" ]; then
    export FUSEDOPT_BUILD_CUDA=0  # no GPU and no architecture asked for: no nvcc build
elif [ "$HAS_CUDA" = 1 ] && [ -z "${FUSEDOPT_BUILD_CUDA:-}" ]; then
    export FUSEDOPT_BUILD_CUDA=1  # a GPU is here: a missing nvcc is an error
fi

OUT=${OUT:-$REPO/gpu-check/$GPU_NAME-$MODE}
mkdir -p "$OUT" "$REPO/benchmarks/results"
OUT=$(cd "$OUT" && pwd)
SITE=$REPO/build/gpu-check-site
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0

# run_step NAME COMMAND...: the command under its time cap, from the install folder, output
# to the console and DIR/NAME.log; the verdict and the seconds go to the summary.
run_step() {
    local name=$1; shift
    local cap=${CAP[$name]} start rc verdict
    echo "== $name (cap ${cap} s)"
    start=$(date +%s)
    (cd "$SITE" && timeout --kill-after=10 "$cap" "$@") 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) verdict=pass ;;
        124|137) verdict="TIMEOUT after ${cap} s" ;;
        *) verdict="FAIL (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || FAILED=1
    printf '%-12s %-22s %5d s\n' "$name" "$verdict" "$(( $(date +%s) - start ))" | tee -a "$SUMMARY"
    return "$rc"
}

has_step() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }

# the tests and tools run with this environment: the installed package first, no
# interpreter, and a test never skips because an extension is missing (it fails instead)
export PYTHONPATH=$SITE
export FUSEDOPT_REQUIRE_BACKENDS=${FUSEDOPT_REQUIRE_BACKENDS:-cpu,cuda,triton,torch}
unset TRITON_INTERPRET
PYTEST=("$PY" -m pytest -p no:cacheprovider -q --rootdir "$REPO" -c "$REPO/pyproject.toml")

# --------------------------------------------------------------------------- steps
echo "fusedopt GPU check ($MODE): $PY, GPU ${GPU_NAME}," \
     "FUSEDOPT_CUDA_ARCHS=${FUSEDOPT_CUDA_ARCHS:-none}," \
     "FUSEDOPT_BUILD_CUDA=${FUSEDOPT_BUILD_CUDA:-auto}; logs in $OUT"
mkdir -p "$SITE"
rm -rf "${SITE:?}"/*
run_step build "$PY" -m pip install --no-build-isolation --no-deps --no-index --target "$SITE" \
    --no-warn-script-location "$REPO" || { echo "build failed: see $OUT/build.log"; exit 1; }
run_step info "$PY" -c "
import sys
from fusedopt.__main__ import info
from fusedopt import backends
info()
missing = [f'{n}: {r}' for n, (ok, r) in backends.available().items() if not ok]
if missing and $HAS_CUDA:  # on a GPU machine every backend must run
    sys.exit('backends unavailable: ' + '; '.join(missing))
"
if [ "$HAS_CUDA" != 1 ]; then
    echo "no CUDA device: torch sees none here, so nothing else runs" \
         "(${FUSEDOPT_CUDA_ARCHS:+nvidia-smi reports sm_$FUSEDOPT_CUDA_ARCHS; }see $OUT/info.log)" \
        | tee -a "$SUMMARY"
    exit 2
fi

SANITIZER=$(command -v compute-sanitizer || true)
for dir in "${CUDA_HOME:-/usr/local/cuda}/bin" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer" \
           "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")"; do
    if [ -z "$SANITIZER" ] && [ -x "$dir/compute-sanitizer" ]; then
        SANITIZER=$dir/compute-sanitizer
    fi
done
# sanitize STEP SELECTION: the cuda tests of SELECTION under compute-sanitizer --tool STEP.
# No caching allocator: every tensor is its own allocation, so memcheck sees an access past
# a tensor's end even where torch would have carved its neighbour from the same block.
sanitize() {
    if [ -z "$SANITIZER" ]; then
        echo "compute-sanitizer not found (PATH, CUDA_HOME, next to nvcc)" | tee "$OUT/$1.log"
        printf '%-12s %-22s\n' "$1" "FAIL (no sanitizer)" | tee -a "$SUMMARY"
        FAILED=1
        return
    fi
    run_step "$1" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$1" \
        --error-exitcode 1 "${PYTEST[@]}" -m gpu -k "${2//$'\n'/ }" "${CUDA_TESTS[@]}"
}

RESULT=$REPO/benchmarks/results/$GPU_NAME
has_step gpu-tests && run_step gpu-tests "${PYTEST[@]}" -m "gpu or gpu_check" \
    --junitxml="$OUT/gpu-tests.xml" "$REPO/tests"
has_step suite && run_step suite "${PYTEST[@]}" --junitxml="$OUT/suite.xml" "$REPO/tests"
if has_step memcheck; then
    if [ "$MODE" = quick ]; then sanitize memcheck "$SANITIZER_SUBSET"
    else sanitize memcheck "$SANITIZER_ALL"; fi
fi
has_step racecheck && sanitize racecheck "$SANITIZER_SUBSET"
has_step synccheck && sanitize synccheck "$SANITIZER_SUBSET"
if has_step bench-quick; then
    run_step bench-quick "$PY" -m fusedopt bench --quick --op cross_entropy,adamw_amp_clip \
        --loss-shape 8192x131072 --label-smoothing 0 --json "$RESULT-quick.json"
    cp -f "$RESULT-quick.json" "$OUT/" 2>/dev/null
fi
if has_step bench; then
    run_step bench "$PY" -m fusedopt bench --json "$RESULT-full.json" --plot "$RESULT-full.png"
    cp -f "$RESULT-full.json" "$RESULT-full.png" "$OUT/" 2>/dev/null
fi

echo "== summary ($OUT/summary.txt)"
cat "$SUMMARY"
exit "$FAILED"
