"""The Triton lean Adam kernel compiles for sm_90 (no GPU needed), and with the launcher's
``enable_fp_fusion=False`` its PTX has no fused multiply-add and only IEEE-rounded
divisions and square roots: the GPU rounds every operation as the interpreter, the cpu and
the torch backends do (docs/lean_states.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _subprocess import OUTSIDE, package_env
from fusedopt import backends

_OK, _REASON = backends.status("triton")
if not _OK:
    pytest.skip(f"triton backend cannot run here: {_REASON}", allow_module_level=True)


def test_lean_kernel_lowers_without_fused_multiply_adds():
    pytest.importorskip("triton.backends.nvidia.compiler",
                        reason="triton has no NVIDIA backend here")
    script = Path(__file__).with_name("triton_lean_lowering.py")
    env = package_env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=OUTSIDE,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"cannot compile for sm_90 here: {proc.stdout.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, counts in variants.items():
        assert not any(op.startswith("fma") for op in counts), (name, counts)
        assert counts.get("div.rn.f32", 0) > 0 and counts.get("sqrt.rn.f32", 0) > 0, (name, counts)
        assert not any(op.startswith(("div.approx", "div.full", "sqrt.approx")) for op in counts), (name, counts)
        assert any(op.startswith("atom.global") for op in counts), (name, counts)  # step counter
        assert any(op.startswith("st.global") for op in counts), (name, counts)
