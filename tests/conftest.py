"""Shared fixtures: the `backend` fixture yields every backend, skipped with the reason
when it cannot run on this machine; `device` is the device that backend runs on here.

FUSEDOPT_REQUIRE_BACKENDS=cpu,cuda,... (scripts/gpu_check.sh sets it) makes a run stop at
once, before any test, when one of these backends cannot run: on the GPU machine a missing
extension must fail the run, never turn the tests that need it into skips."""

import os

import pytest
import torch

from fusedopt import backends

HAS_CUDA = torch.cuda.is_available()


def backend_device(name: str) -> torch.device:
    if name == "cuda":
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if HAS_CUDA else "cpu")


def _backend_params():
    params = []
    for name in backends.NAMES:
        ok, reason = backends.status(name)
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name!r} cannot run here: {reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    return request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


def require_op(backend: str, op: str) -> torch.device:
    """Skip (with the reason) when `backend` has no kernel for `op` on its device here."""
    dev = backend_device(backend)
    ok, reason = backends._usable(backend, op, dev)
    if not ok:
        pytest.skip(f"backend {backend!r}: {reason}")
    return dev


def required_backends() -> list[str]:
    names = [n.strip() for n in os.environ.get("FUSEDOPT_REQUIRE_BACKENDS", "").split(",")]
    return [n for n in names if n]


def pytest_sessionstart(session):
    required = required_backends()
    unknown = [n for n in required if n not in backends.NAMES]
    missing = [f"{n}: {backends.status(n)[1]}" for n in required
               if n in backends.NAMES and not backends.status(n)[0]]
    if unknown or missing:
        pytest.exit("FUSEDOPT_REQUIRE_BACKENDS: " + "; ".join(
            [f"unknown backend {n!r}" for n in unknown] + [f"cannot run {m}" for m in missing]),
            returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, CUDA available: {HAS_CUDA}, "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
    for name, (ok, reason) in backends.available().items():
        lines.append(f"backend {name}: {'ok' if ok else 'unavailable: ' + reason}")
    if required_backends():
        lines.append(f"required backends: {', '.join(required_backends())}")
    return lines


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
