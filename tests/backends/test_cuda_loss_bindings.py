"""The loss half of fusedopt._cuda where it is built, with or without a GPU (CI included):
the functions are bound with the cpu module's argument lists (only the last argument
differs), bad codes are refused with cudaErrorInvalidValue before anything touches a
device, empty inputs launch nothing and return cudaSuccess, and -- on a machine without a
usable device -- a real call returns the runtime's error code instead of crashing. The
launcher module lists its ops, so the generic tests (tests/ops, `require_op`) run the `cuda`
backend wherever it can run. None of these launches a kernel on a device."""

import re

import pytest
import torch

try:
    from fusedopt import _cuda
except ImportError as exc:
    pytest.skip(f"fusedopt._cuda is not built here ({exc})", allow_module_level=True)

from fusedopt import backends

SUCCESS, INVALID_VALUE = 0, 1  # cudaSuccess, cudaErrorInvalidValue
LOSS_FUNCTIONS = ["cross_entropy_fwd", "focal_loss_fwd", "sigmoid_focal_loss_fwd", "scale_grad"]
A = 256  # a 16-byte aligned stand-in address: never dereferenced by these calls


def _no_device() -> bool:
    err, count = _cuda.device_count()
    return err != 0 or count == 0


def _argument_names(fn):
    signature = fn.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", signature[signature.index("(") + 1:])


def _ce(dtype=0, index_type=0, n_rows=4, n_cols=10, scales=A, weight=0, smoothing=0.0,
        softcap=0.0, soft=False, workspace=0, logits=A, target=A):
    return _cuda.cross_entropy_fwd(
        logits=logits, logits_row_stride=n_cols, grad=A, grad_row_stride=n_cols, row_loss=A,
        target=target, target_row_stride=n_cols if soft else 0, weight=weight, scales=scales,
        n_rows=n_rows, n_cols=n_cols, dtype=dtype, index_type=index_type, ignore_index=-100,
        label_smoothing=smoothing, z_loss=0.0, softcap=softcap, soft_target=soft, stream=0,
        workspace=workspace)


def _focal(dtype=0, index_type=0, n_rows=4, n_cols=10):
    return _cuda.focal_loss_fwd(A, n_cols, A, n_cols, A, A, 0, A, n_rows, n_cols, dtype,
                                index_type, -100, 2.0, 0.1, 0)


def _sigmoid(dtype=0, n=8, reduce=True):
    return _cuda.sigmoid_focal_loss_fwd(A, A, A, A, A, n, dtype, 0.25, 2.0, 0.0, reduce, 0)


def test_loss_functions_are_bound_with_the_cpu_argument_lists():
    for name in LOSS_FUNCTIONS:
        cuda_args = _argument_names(getattr(_cuda, name))
        assert "stream" in cuda_args, (name, cuda_args)
        try:
            from fusedopt import _cpu
        except ImportError:
            continue
        cpu_args = _argument_names(getattr(_cpu, name))
        assert [a if a != "num_threads" else "stream" for a in cpu_args] == cuda_args, name
    assert _cuda.SIGMOID_FOCAL_SPAN == 4096


def test_bad_codes_and_missing_pointers_are_refused_before_any_launch():
    assert _ce(dtype=3) == INVALID_VALUE
    assert _ce(dtype=-1) == INVALID_VALUE
    assert _ce(index_type=5) == INVALID_VALUE
    assert _ce(n_cols=0) == INVALID_VALUE
    assert _ce(n_rows=-1) == INVALID_VALUE
    assert _ce(scales=0) == INVALID_VALUE
    assert _ce(logits=0) == INVALID_VALUE
    assert _ce(target=0) == INVALID_VALUE
    # class weights with smoothing need the fp32 workspace for their sum
    assert _ce(weight=A, smoothing=0.1, workspace=0) == INVALID_VALUE
    assert _focal(dtype=9) == INVALID_VALUE
    assert _focal(index_type=3) == INVALID_VALUE
    assert _focal(n_cols=0) == INVALID_VALUE
    assert _sigmoid(dtype=3) == INVALID_VALUE
    assert _sigmoid(n=-5) == INVALID_VALUE
    assert _cuda.scale_grad(A, 8, 3, A, 0) == INVALID_VALUE
    assert _cuda.scale_grad(A, 8, 0, 0, 0) == INVALID_VALUE
    assert "invalid argument" in _cuda.error_string(INVALID_VALUE)


def test_empty_inputs_return_success_and_launch_nothing():
    assert _ce(n_rows=0) == SUCCESS
    assert _ce(n_rows=0, soft=True) == SUCCESS
    assert _ce(n_rows=0, dtype=1, n_cols=30000) == SUCCESS
    assert _focal(n_rows=0) == SUCCESS
    assert _sigmoid(n=0) == SUCCESS
    assert _sigmoid(n=0, reduce=False) == SUCCESS
    assert _cuda.scale_grad(A, 0, 2, A, 0) == SUCCESS


def test_without_a_device_every_call_returns_the_runtime_error():
    if not _no_device():
        pytest.skip("a CUDA device is present: these calls would launch on stand-in addresses")
    codes = {
        "cross_entropy fp32, cached row": _ce(),
        "cross_entropy bf16, 60 KB row (shared-memory opt-in)": _ce(dtype=1, n_cols=30000),
        "cross_entropy fp32, uncached row": _ce(n_cols=40000),
        "cross_entropy soft targets, soft-capped": _ce(soft=True, softcap=5.0),
        "cross_entropy weights + smoothing": _ce(weight=A, smoothing=0.1, workspace=A),
        "focal_loss": _focal(),
        "sigmoid_focal_loss": _sigmoid(),
        "scale_grad": _cuda.scale_grad(A, 100, 1, A, 0),
    }
    device_err = _cuda.device_count()[0]
    for what, code in codes.items():
        assert code not in (SUCCESS, INVALID_VALUE), f"{what}: returned {code}"
        if device_err != 0:
            assert code == device_err, f"{what}: {_cuda.error_string(code)}"


def test_launcher_errors_and_op_list():
    from fusedopt.backends.cuda import _errors, losses

    _errors.check(SUCCESS, "nothing")
    with pytest.raises(RuntimeError, match="cross_entropy_fwd failed: invalid argument"):
        _errors.check(INVALID_VALUE, "cross_entropy_fwd")
    assert losses.OPS == {"cross_entropy", "focal_loss", "sigmoid_focal_loss"}
    for name in losses.__all__:
        assert callable(getattr(losses, name)), name
    from fusedopt.backends import cuda as package

    for op in losses.OPS:
        assert op in package.OPS
        assert package.supports(op, torch.device("cuda")) == (True, "")
        ok, reason = package.supports(op, torch.device("cpu"))
        assert not ok and "CUDA tensors" in reason
    ok, reason = backends.status("cuda")
    if _no_device():
        assert not ok and reason  # the generic tests skip the cuda backend with this reason
