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


def test_info_command_prints_every_backend():
    out = subprocess.run([sys.executable, "-m", "fusedopt", "info"], capture_output=True,
                         text=True, check=True).stdout
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
