"""Inputs that used to crash the process (out-of-bounds kernel accesses) or silently step
with wrong tensors: odd checkpoints, edited state (trust_state_cases.py), swapped gradients
and params, tensor subclasses, bad lists handed straight to a backend
(trust_input_cases.py), DTensor params (trust_dtensor_cases.py).  Run as a script in a subprocess (tests/optim/test_trust.py), so
that a crash is a test failure, not a dead pytest:

    python tests/optim/trust_cases.py BACKEND

Each case prints ``PASS name`` or ``FAIL name: why``; the exit status is 0 when all
passed.  A refused input must raise the expected error before any kernel runs, with params
and optimizer state bit-identical and a later good step working."""

from __future__ import annotations

import sys
import traceback

import trust_state_cases  # noqa: F401  (registers its cases, in this order)
import trust_input_cases  # noqa: F401,I001
import trust_dtensor_cases  # noqa: F401,I001
from trust_common import CASES


def main(backend: str) -> int:
    failed = 0
    for fn in CASES:
        try:
            fn(backend)
        except Exception:
            failed += 1
            why = traceback.format_exc().strip().splitlines()
            print(f"FAIL {fn.__name__}: {' | '.join(why[-3:])}", flush=True)
        else:
            print(f"PASS {fn.__name__}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
