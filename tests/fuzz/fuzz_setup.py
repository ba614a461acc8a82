"""Hypothesis profiles of the fuzz suite and the worker process its examples run in
(imported by the fuzz test modules; not a conftest.py, whose module name the tests'
``from conftest import ...`` of tests/conftest.py would collide with).

- ``fuzz-ci`` (the default): few examples per property, derandomized (the same examples on
  every run and machine, so a CI failure reproduces), no deadline, no example database;
  the whole suite takes about a minute on 2 cores.
- ``fuzz-deep``: many examples, random, with hypothesis's example database (so a failure
  found once is tried first next time): ``HYPOTHESIS_PROFILE=fuzz-deep pytest tests/fuzz``
  (docs/trust.md).  FUSEDOPT_FUZZ_EXAMPLES=N overrides the number of examples of either.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from worker import Worker

_EXAMPLES = int(os.environ.get("FUSEDOPT_FUZZ_EXAMPLES") or 0) or None
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("fuzz-ci", max_examples=_EXAMPLES or 25, derandomize=True,
                          database=None, **_COMMON)
settings.register_profile("fuzz-deep", max_examples=_EXAMPLES or 1500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz-ci"))


@pytest.fixture(scope="session")
def worker():
    w = Worker()
    yield w
    w.close()


def examples(n_ci: int):
    """Scale a property's CI example count (the profile's max_examples is 25) by n_ci/25."""
    return max(1, settings().max_examples * n_ci // 25)
