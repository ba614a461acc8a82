"""Inputs that used to crash the process or silently step with wrong tensors (odd
checkpoints, edited state, swapped gradients and params, tensor subclasses, bad lists handed
to a backend) are refused before any kernel runs, with nothing changed.  The cases
(trust_state_cases.py, trust_input_cases.py) run in a subprocess per backend
(trust_cases.py), so a crash fails the test instead of killing pytest."""

import subprocess
import sys
from pathlib import Path

import pytest

from _subprocess import OUTSIDE, package_env
from conftest import require_op
from trust_cases import CASES

HERE = Path(__file__).resolve().parent


def test_trust_cases_in_a_subprocess(backend):
    require_op(backend, "adam")
    proc = subprocess.run([sys.executable, str(HERE / "trust_cases.py"), backend], cwd=OUTSIDE,
                          env=package_env(), capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    assert proc.returncode >= 0, (f"the {backend} cases crashed (signal {-proc.returncode}) after:\n"
                                  + "\n".join(lines[-3:]) + "\n" + proc.stderr[-2000:])
    failed = [line for line in lines if line.startswith("FAIL")]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split()[1] for line in lines] == [fn.__name__ for fn in CASES]
