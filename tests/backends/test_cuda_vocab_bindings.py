"""The vocab-parallel half of fusedopt._cuda where it is built, with or without a GPU (CI
included): the two functions are bound with the cpu module's argument lists (only the last
argument differs), the params check both backends share (params_vocab_parallel.h) refuses
bad codes, sizes, class ranges, row strides and missing addresses before anything touches
memory -- cudaErrorInvalidValue from _cuda, the LossStatus codes from _cpu --, zero rows
launch nothing, and without a usable device a real call returns the runtime's error code.
The launcher refuses tensors that are not plain CUDA tensors before taking an address, and
the backend lists the op, so `backend=None` on CUDA tensors keeps its order. None of these
launches a kernel on a device; the kernels themselves: tests/ops/test_vocab_parallel_kernels.py."""

import re

import pytest
import torch

try:
    from fusedopt import _cuda
except ImportError as exc:
    pytest.skip(f"fusedopt._cuda is not built here ({exc})", allow_module_level=True)

from fusedopt import backends

OP = "vocab_parallel_cross_entropy"
SUCCESS, INVALID_VALUE = 0, 1  # cudaSuccess, cudaErrorInvalidValue
BAD_DTYPE, BAD_INDEX_TYPE, BAD_SHAPE, MISSING_ADDRESS = 1, 2, 3, 4  # LossStatus of _cpu
A = 256  # a 16-byte aligned stand-in address: never dereferenced by these calls
FUNCTIONS = ["vocab_parallel_row_stats", "vocab_parallel_grad"]


def _cpu_module():
    try:
        from fusedopt import _cpu
    except ImportError:
        return None
    return _cpu


def _no_device() -> bool:
    err, count = _cuda.device_count()
    return err != 0 or count == 0


def _argument_names(fn):
    signature = fn.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", signature[signature.index("(") + 1:])


def _call(module, grad_pass=False, **overrides):
    """One call of `module`'s row-stats (or gradient) function with valid arguments for 4
    rows of 10 columns (classes [10, 20) of 40) at stand-in addresses, `overrides` applied."""
    args = dict(logits=A, logits_row_stride=10, target=A, target_row_stride=0, weight=0,
                n_rows=4, n_cols=10, class_offset=10, num_classes=40, ignore_index=-100,
                dtype=0, index_type=0, label_smoothing=0.1, softcap=0.0, soft_target=False)
    if grad_pass:
        args.update(coefs=A, grad=A, grad_row_stride=10)
    else:
        args.update(stats=A)
    args.update(overrides)
    last = "stream" if module is _cuda else "num_threads"
    args.setdefault(last, 0 if module is _cuda else 1)
    fn = module.vocab_parallel_grad if grad_pass else module.vocab_parallel_row_stats
    return fn(**args)


# (overrides, the LossStatus the cpu kernel returns, which passes it applies to)
REFUSED = {
    "dtype 3": (dict(dtype=3), BAD_DTYPE, "both"),
    "dtype -1": (dict(dtype=-1), BAD_DTYPE, "both"),
    "index type 3": (dict(index_type=3), BAD_INDEX_TYPE, "both"),
    "no columns": (dict(n_cols=0), BAD_SHAPE, "both"),
    "negative rows": (dict(n_rows=-1), BAD_SHAPE, "both"),
    "negative offset": (dict(class_offset=-1), BAD_SHAPE, "both"),
    "classes past the vocabulary": (dict(class_offset=31), BAD_SHAPE, "both"),
    "vocabulary narrower than the shard": (dict(num_classes=5, class_offset=0), BAD_SHAPE,
                                           "both"),
    "offset that would overflow": (dict(class_offset=2 ** 63 - 1, num_classes=2 ** 63 - 1),
                                   BAD_SHAPE, "both"),
    "overlapping logit rows": (dict(logits_row_stride=9), BAD_SHAPE, "both"),
    "overlapping soft target rows": (dict(soft_target=True, target_row_stride=3), BAD_SHAPE,
                                     "both"),
    "overlapping gradient rows": (dict(grad_row_stride=0), BAD_SHAPE, "grad"),
    "no logits": (dict(logits=0), MISSING_ADDRESS, "both"),
    "no target": (dict(target=0), MISSING_ADDRESS, "both"),
    "no stats": (dict(stats=0), MISSING_ADDRESS, "stats"),
    "no coefs": (dict(coefs=0), MISSING_ADDRESS, "grad"),
    "no gradient": (dict(grad=0), MISSING_ADDRESS, "grad"),
}


def test_vocab_functions_are_bound_with_the_cpu_argument_lists():
    cpu = _cpu_module()
    for name in FUNCTIONS:
        cuda_args = _argument_names(getattr(_cuda, name))
        assert cuda_args[-1] == "stream", (name, cuda_args)
        if cpu is not None:
            cpu_args = _argument_names(getattr(cpu, name))
            assert [a if a != "num_threads" else "stream" for a in cpu_args] == cuda_args, name


@pytest.mark.parametrize("case", REFUSED)
def test_the_shared_check_refuses_before_any_launch(case):
    overrides, cpu_status, passes = REFUSED[case]
    cpu = _cpu_module()
    for grad_pass in (False, True):
        if passes != "both" and passes != ("grad" if grad_pass else "stats"):
            continue
        assert _call(_cuda, grad_pass, **overrides) == INVALID_VALUE, (case, grad_pass)
        if cpu is not None:
            assert _call(cpu, grad_pass, **overrides) == cpu_status, (case, grad_pass)
    assert "invalid argument" in _cuda.error_string(INVALID_VALUE)


def test_zero_rows_return_success_and_launch_nothing():
    for grad_pass in (False, True):
        for soft in (False, True):
            assert _call(_cuda, grad_pass, n_rows=0, soft_target=soft,
                         target_row_stride=10 if soft else 0) == SUCCESS


def test_without_a_device_every_call_returns_the_runtime_error():
    if not _no_device():
        pytest.skip("a CUDA device is present: these calls would launch on stand-in addresses")
    device_err = _cuda.device_count()[0]
    for grad_pass in (False, True):
        for overrides in (dict(), dict(dtype=1, softcap=3.0), dict(label_smoothing=0.0),
                          dict(soft_target=True, target_row_stride=10, dtype=2)):
            code = _call(_cuda, grad_pass, **overrides)
            assert code not in (SUCCESS, INVALID_VALUE), (grad_pass, overrides, code)
            if device_err != 0:
                assert code == device_err, _cuda.error_string(code)


def _shard(**overrides):
    return dict(dict(class_offset=0, num_classes=6, ignore_index=-100, label_smoothing=0.1,
                     softcap=None, soft_target=False), **overrides)


def test_the_launcher_refuses_tensors_it_cannot_hand_to_the_kernels():
    """Checked before any address is taken, so no device is needed to see the errors."""
    from fusedopt.backends.cuda import vocab_parallel as launcher

    class Subclass(torch.Tensor):
        pass

    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        launcher.vocab_parallel_row_stats(x, y, None, **_shard())
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        launcher.vocab_parallel_grad(x, y, None, torch.zeros(4, 5), inplace=False, **_shard())
    with pytest.raises(TypeError, match="plain torch.Tensor"):
        launcher.vocab_parallel_row_stats(x.as_subclass(Subclass), y, None, **_shard())
    with pytest.raises(TypeError, match="logits must be a tensor, got list"):
        launcher.vocab_parallel_row_stats([[0.0]], y, None, **_shard())


def test_the_backend_lists_the_op_and_keeps_the_default_order(monkeypatch):
    from fusedopt.backends import cuda as package
    from fusedopt.backends.cuda import vocab_parallel as launcher

    assert launcher.OPS == {OP} and OP in package.OPS
    for name in launcher.__all__:
        assert callable(getattr(package, name)), name
    assert package.supports(OP, torch.device("cuda")) == (True, "")
    ok, reason = package.supports(OP, torch.device("cpu"))
    assert not ok and "CUDA tensors" in reason
    # backend=None on CUDA tensors: triton, then cuda, then torch (README "Backends")
    runnable = {"triton", "cuda", "torch"}
    monkeypatch.setattr(backends, "status",
                        lambda name: (name in runnable, "" if name in runnable else "off"))
    assert backends.select(OP, "cuda").__name__ == "fusedopt.backends.triton"
    runnable.discard("triton")
    assert backends.select(OP, "cuda") is package
    runnable.discard("cuda")
    assert backends.select(OP, "cuda").__name__ == "fusedopt.backends.torch_ref"
