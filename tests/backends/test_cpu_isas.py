"""The CPU kernels give the same bits whichever ISA clone runs them.  The build compiles
every inner loop for x86-64-v4, x86-64-v3 and baseline x86-64 and the loader picks one
from the CPU; isa_clone_run.py forces each clone of the built extension in turn (it points
the ifunc slots at ``<function>.<clone>``) and hashes the outputs of the optimizer kernels
(Adam/AdamW, SGD, the norm, lean Adam; fp32/bf16/fp16, every option) and of the loss
kernels (the vocab-parallel ones included).  A clone the CPU cannot run is skipped with the
missing features named."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from _subprocess import OUTSIDE, package_env

cpu = pytest.importorskip("fusedopt.backends.cpu")
if "adam" not in cpu.OPS:
    pytest.skip(f"the cpu backend cannot run here: {cpu.status()[1]}", allow_module_level=True)

HERE = Path(__file__).resolve().parent
# the CPU features (as /proc/cpuinfo names them) each clone needs beyond the baseline
LEVELS = {
    "arch_x86_64_v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"},
    "arch_x86_64_v4": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe",
                       "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def _cpu_flags() -> set:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def hashes():
    """{clone: (optimizer hash, loss hash)} for the baseline and every clone this CPU runs."""
    if platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists():
        pytest.skip(f"the ISA clones are x86-64 (Linux) only; this is {platform.machine()}")
    flags = _cpu_flags()
    clones = ["default"] + [c for c, need in LEVELS.items() if need <= flags]
    proc = subprocess.run([sys.executable, str(HERE / "isa_clone_run.py"), *clones], cwd=OUTSIDE,
                          env=package_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        clone, _, slots, _, changed, _, optimizers, _, losses = line.split()
        assert int(slots) > 0, "no ifunc slot found: the build has no clones"
        out[clone] = (optimizers, losses)
    return out, flags


@pytest.mark.parametrize("clone", sorted(LEVELS))
def test_every_clone_gives_the_baseline_bits(hashes, clone):
    results, flags = hashes
    if clone not in results:
        pytest.skip(f"this CPU lacks {', '.join(sorted(LEVELS[clone] - flags))}: the {clone} "
                    f"clone cannot run here")
    assert results[clone][0] == results["default"][0], "optimizer kernels differ"
    assert results[clone][1] == results["default"][1], "loss kernels differ"
