"""The backend registry: available(), select(), FUSEDOPT_BACKEND, errors."""

import subprocess
import sys

import pytest
import torch

from fusedopt import backends


def test_available_lists_every_backend_with_a_reason():
    status = backends.available()
    assert set(status) == {"triton", "cuda", "cpu", "torch"}
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool)
        assert ok or reason, f"{name} is unavailable without a reason"
    assert status["torch"] == (True, "")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="'nope'"):
        backends.select("cross_entropy", "cpu", "nope")


def test_unknown_op_is_a_value_error():
    with pytest.raises(ValueError, match="'lamb'"):
        backends.select("lamb", "cpu")


def test_explicit_torch_backend_runs_anywhere():
    assert backends.select("adam", "cpu", "torch").NAME == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_explicit_unavailable_backend_names_it_and_the_reason():
    with pytest.raises(RuntimeError, match=r"backend 'cuda'.*(CUDA|cuda)"):
        backends.select("cross_entropy", "cpu", "cuda")


def test_env_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FUSEDOPT_BACKEND", "torch")
    assert backends.select("cross_entropy", "cpu").NAME == "torch"
    monkeypatch.setenv("FUSEDOPT_BACKEND", "cuda")
    if not backends.available()["cuda"][0]:
        with pytest.raises(RuntimeError, match="FUSEDOPT_BACKEND"):
            backends.select("cross_entropy", "cpu")


def test_an_explicit_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("FUSEDOPT_BACKEND", "cuda")
    assert backends.select("sgd", "cpu", "torch").NAME == "torch"


def test_default_for_cpu_tensors_is_cpu_kernels_when_built():
    chosen = backends.select("adam", "cpu").NAME
    expected = "cpu" if "cpu" in backends.usable("adam", "cpu") else "torch"
    assert chosen == expected


def test_info_command_prints_every_backend(tmp_path):
    # from outside the checkout: `python -m` would put the source tree first on sys.path
    out = subprocess.run([sys.executable, "-m", "fusedopt", "info"], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    for name in ("triton", "cuda", "cpu", "torch"):
        assert name in out
    assert "torch    " + torch.__version__ in out


def test_cpu_extension_is_importable():
    import fusedopt._cpu as cpu

    assert cpu.max_threads() >= 1


def test_cuda_extension_is_built_whenever_nvcc_is_present():
    import os
    import shutil

    if os.environ.get("FUSEDOPT_BUILD_CUDA") == "0":
        pytest.skip("FUSEDOPT_BUILD_CUDA=0: the CUDA extension was not requested")
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("no nvcc on this machine, so fusedopt._cuda is not built")
    import fusedopt._cuda as cuda

    err, count = cuda.device_count()
    assert isinstance(err, int) and isinstance(count, int)
    assert cuda.runtime_version() >= 12000


def test_a_driver_too_old_for_the_linked_runtime_is_explained():
    from fusedopt.backends.cuda import driver_problem, driver_requirement

    reason = driver_problem(35, runtime=13000, driver=12040)  # cudaErrorInsufficientDriver
    assert "CUDA 12.4" in reason and "CUDA 13.0" in reason and "R580+" in reason
    assert driver_requirement(12080) == "an NVIDIA driver for CUDA 12.8 or newer (R525+)"
    assert driver_requirement(14000) == "an NVIDIA driver for CUDA 14.0 or newer"
    assert "no NVIDIA driver" in driver_problem(35, runtime=13000, driver=0)
    assert driver_problem(100, runtime=13000, driver=13000) == "no CUDA device"


def test_info_says_which_driver_the_cuda_extension_needs(tmp_path):
    try:
        from fusedopt import _cuda
    except ImportError:
        pytest.skip("fusedopt._cuda is not built here")
    out = subprocess.run([sys.executable, "-m", "fusedopt", "info"], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    runtime = _cuda.runtime_version()
    assert f"CUDA {runtime // 1000}.{runtime % 1000 // 10} runtime linked statically" in out
    assert "needs an NVIDIA driver for CUDA" in out
    if _cuda.driver_version() == 0:
        assert "no NVIDIA driver is installed" in backends.status("cuda")[1]


def test_supported_versions_match_the_declared_requirements():
    import pathlib
    import re

    from fusedopt._versions import SUPPORTED, support_note

    root = pathlib.Path(__file__).resolve().parents[2]
    pyproject = (root / "pyproject.toml").read_text()
    for name, ((major, minor), _) in SUPPORTED.items():
        declared = set(re.findall(rf'"{name}>=([0-9.]+)"', pyproject))
        assert declared == {f"{major}.{minor}"}, (name, declared)
    assert support_note("torch", "2.11.0+cu130") == ""
    assert support_note("triton", "3.9.0") == ""
    assert "older than supported" in support_note("torch", "2.10.1")
    assert "newer than tested" in support_note("triton", "3.10.0")
