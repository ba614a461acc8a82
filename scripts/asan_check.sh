#!/usr/bin/env bash
# AddressSanitizer check of the cpu extension: builds fusedopt._cpu with
# FUSEDOPT_SANITIZE=address into a temporary folder (the checkout and its own build stay
# untouched), lays out a package that is the source tree plus that module, and runs the
# fuzz suite and the cpu backend tests against it with the ASan runtime preloaded.  Any
# invalid read or write, use after free or double free in the C++ kernels stops the run
# with ASan's report and a non-zero exit status.
#
#   bash scripts/asan_check.sh                  # the fuzz suite (CI profile) + cpu tests
#   HYPOTHESIS_PROFILE=fuzz-deep bash scripts/asan_check.sh   # more examples per property
#   bash scripts/asan_check.sh -x -k adam       # extra arguments go to pytest
#
# PYTHON (default: python3) must have torch, triton, pytest, hypothesis, pybind11 and
# setuptools.  The python itself is not instrumented, so the runtime is preloaded:
# LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)";
# ASAN_OPTIONS switches leak detection off (python and torch keep their caches until exit).
# Takes 2-4 min to build, then about a minute for the cpu tests and some for the fuzz suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
start=$(date +%s)

LIBASAN=$(gcc -print-file-name=libasan.so)
# preloaded too: python does not link libstdc++, so without it the runtime finds no real
# __cxa_throw and aborts ("CHECK failed ... real___cxa_throw") at the first C++ exception
# (every binding that raises a ValueError throws one)
LIBSTDCXX=$(gcc -print-file-name=libstdc++.so)
if [ ! -e "$LIBASAN" ]; then
    echo "asan_check.sh: gcc has no libasan.so (gcc -print-file-name=libasan.so: $LIBASAN)" >&2
    exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "== building fusedopt._cpu with AddressSanitizer in $WORK"
FUSEDOPT_SANITIZE=address FUSEDOPT_BUILD_CUDA=0 "$PYTHON" setup.py -q build_ext \
    --build-lib "$WORK/lib" --build-temp "$WORK/build" > "$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; exit 1; }
MODULE=$(ls "$WORK"/lib/fusedopt/_cpu*.so)
echo "== built in $(( $(date +%s) - start )) s"

# The package: every source entry of fusedopt/ copied (not linked: the tests' child
# processes find the package from its resolved path), plus the sanitized module (no other
# compiled module, so nothing unsanitized is imported from the checkout).
PKG="$WORK/site/fusedopt"
mkdir -p "$PKG"
for entry in "$ROOT"/fusedopt/*; do
    case "$entry" in *.so|*/__pycache__) continue ;; esac
    cp -r "$entry" "$PKG/"
done
cp "$MODULE" "$PKG/"

TESTS=(tests/fuzz
       tests/backends/test_cpu_losses.py tests/backends/test_cpu_focal.py
       tests/backends/test_cpu_optim.py tests/backends/test_loss_boundary.py
       tests/backends/test_loss_trust_kernels.py tests/optim/test_trust.py
       tests/ops/test_vocab_parallel_shards.py tests/ops/test_vocab_parallel_kernels.py
       tests/ops/test_loss_fuzz_finds.py tests/ops/test_loss_trust.py
       tests/backends/test_cpu_lean.py tests/backends/test_lean_adam.py
       tests/backends/test_lean_boundary.py tests/optim/test_lean_states.py)
# from outside the checkout, so `fusedopt` is the package above; subprocesses of the tests
# inherit the preload and import the same package
cd "$WORK/site"
set +e
LD_PRELOAD="$LIBASAN $LIBSTDCXX" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99:halt_on_error=1:${ASAN_OPTIONS:-}" \
TRITON_INTERPRET=1 PYTHONPATH="$WORK/site" \
    "$PYTHON" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
    -k "not triton" "${TESTS[@]/#/$ROOT/}" "$@"
rc=$?
set -e
echo "== asan_check.sh: pytest exit $rc after $(( $(date +%s) - start )) s"
exit $rc
