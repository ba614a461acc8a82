"""fusedopt._cuda without a GPU: the module imports (static CUDA runtime), binds every
entry point, and refuses bad arguments -- with ValueError when a table is built, or with
cudaErrorInvalidValue returned before anything touches a device. On a machine with a GPU
these run too (they never launch a kernel). The loss functions' checks are in
test_cuda_loss_bindings.py."""

import pytest

try:
    from fusedopt import _cuda
except ImportError as exc:
    pytest.skip(f"fusedopt._cuda is not built here ({exc})", allow_module_level=True)

INVALID_VALUE = 1  # cudaErrorInvalidValue


def test_every_entry_point_is_bound():
    for name in ["cross_entropy_fwd", "focal_loss_fwd", "sigmoid_focal_loss_fwd", "scale_grad",
                 "AdamTable", "SgdTable", "NormTable", "device_count", "error_string",
                 "runtime_version", "driver_version"]:
        assert hasattr(_cuda, name), name
    assert 1 <= _cuda.MAX_TENSORS <= 255  # a chunk's slot is stored in one byte
    assert _cuda.MAX_CHUNKS >= 1 and _cuda.DEFAULT_CHUNK_SIZE >= 1
    assert _cuda.runtime_version() >= 12010  # kernel tables above 4 KB need CUDA 12.1+
    assert _cuda.driver_version() >= 0  # 0: no driver


def _adam_table(n, numel=8, **kw):
    args = dict(numel=[numel] * n, dtype=0, params=[16] * n, exp_avgs=[16] * n,
                exp_avg_sqs=[16] * n, max_exp_avg_sqs=None, master_params=None, steps=[16] * n,
                chunk_size=_cuda.DEFAULT_CHUNK_SIZE, max_tensors=_cuda.MAX_TENSORS,
                max_chunks=_cuda.MAX_CHUNKS)
    args.update(kw)
    return _cuda.AdamTable(**args)


def test_tables_validate_their_lists():
    with pytest.raises(ValueError, match="exp_avgs has 2 addresses, expected 3"):
        _adam_table(3, exp_avgs=[16, 16])
    with pytest.raises(ValueError, match="dtype code"):
        _adam_table(2, dtype=4)
    with pytest.raises(ValueError, match="chunk_size"):
        _adam_table(2, chunk_size=0)
    with pytest.raises(ValueError, match="initialized has 1 addresses, expected 2"):
        _cuda.SgdTable([4, 4], 0, [16, 16], None, None, [16], 1024, 4, 4)
    with pytest.raises(ValueError, match="dtype code"):
        _cuda.NormTable([4], 7, 1024, 4, 4)


def _adam_step(table, grads, amsgrad=False):
    return table.step(grads, 1e-3, 0, 0.9, 0, 0.999, 0, 1e-8, 0.0, amsgrad, False, True, 0, 0, 0,
                      stream=0)


def test_steps_refuse_inconsistent_calls_before_any_launch():
    table = _adam_table(3)
    assert _adam_step(table, [16, 16]) == INVALID_VALUE           # one gradient missing
    assert _adam_step(table, [16] * 3, amsgrad=True) == INVALID_VALUE  # no max_exp_avg_sqs
    # a plan whose launches exceed the kernel table: refused before anything runs
    big = _adam_table(_cuda.MAX_TENSORS + 1, max_tensors=_cuda.MAX_TENSORS + 1)
    assert _adam_step(big, [16] * (_cuda.MAX_TENSORS + 1)) == INVALID_VALUE
    norm = _cuda.NormTable([5, 7], 0, 4, 8, 8)
    assert norm.num_chunks == 2 + 2
    assert norm.norm([16, 16], 0, 16, scratch=0, stream=0) == INVALID_VALUE  # no scratch
    assert norm.norm([16], 0, 16, scratch=16, stream=0) == INVALID_VALUE     # one tensor missing


def test_cuda_errors_become_runtime_errors():
    from fusedopt.backends.cuda._errors import check

    check(0, "nothing")
    with pytest.raises(RuntimeError, match="adam_step failed: invalid argument"):
        check(INVALID_VALUE, "adam_step")
