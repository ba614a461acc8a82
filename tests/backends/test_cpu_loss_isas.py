"""The CPU loss kernels give the same bits whichever ISA clone runs them (x86-64-v4,
x86-64-v3, baseline x86-64): each is built on its own from the same sources with the
project's compile flags (read from setup.py) and hashes the outputs of every kernel on
fixed inputs.  This machine only ever selects one clone, hence this build-and-compare test.
It compiles three programs (~40 s), so it runs only with FUSEDOPT_ISA_CHECK=1."""

import ast
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cxx_flags():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CXX_FLAGS":
            return ast.literal_eval(node.value)
    raise AssertionError("CXX_FLAGS not found in setup.py")


@pytest.mark.skipif(os.environ.get("FUSEDOPT_ISA_CHECK") != "1",
                    reason="builds the loss kernels three times (~40 s); set FUSEDOPT_ISA_CHECK=1")
def test_every_isa_gives_the_same_bits(tmp_path):
    if platform.machine() != "x86_64" or shutil.which("g++") is None:
        pytest.skip("needs g++ on x86-64")
    sources = [ROOT / "tests/backends/loss_isa_check.cpp", ROOT / "csrc/cpu/cross_entropy.cpp",
               ROOT / "csrc/cpu/focal.cpp", ROOT / "csrc/cpu/loss_buffers.cpp"]
    flags = [f for f in _cxx_flags() if not f.startswith("-W")]
    hashes = {}
    for level in ("x86-64-v4", "x86-64-v3", "x86-64"):
        exe = tmp_path / f"check-{level}"
        subprocess.run(["g++", *flags, "-DFO_LOSS_CLONES=", f"-march={level}",
                        f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cpu'}",
                        *map(str, sources), "-o", str(exe)], check=True)
        if level == "x86-64-v4" and "avx512f" not in Path("/proc/cpuinfo").read_text():
            continue  # cannot run AVX-512 code here
        hashes[level] = subprocess.run([str(exe)], check=True, capture_output=True,
                                       text=True).stdout.strip()
    assert len(set(hashes.values())) == 1, hashes
