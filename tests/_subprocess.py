"""Child processes that run against the same fusedopt as the tests.

Some checks run in a child process, so that a crash fails one test instead of killing the
whole run.  The child must import the package the tests import: under `make test` that is
the installed package (with its compiled extensions), not the source tree of the checkout,
which has none.  So a child gets the folder holding the imported `fusedopt` first on its
PYTHONPATH, and runs from a folder outside the checkout (`python -c` and `python -m` put
the working directory first on sys.path)."""

import os
import tempfile
from pathlib import Path

import fusedopt

PACKAGE_PARENT = str(Path(fusedopt.__file__).resolve().parents[1])
OUTSIDE = tempfile.gettempdir()


def package_env(**overrides: str) -> dict:
    """os.environ with the imported package's folder first on PYTHONPATH, plus overrides."""
    rest = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PACKAGE_PARENT, rest) if p))
    env.update(overrides)
    return env
