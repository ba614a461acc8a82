"""Argument errors of the losses: raised before any kernel, naming the argument
and the value; backend selection errors; out-of-range class targets."""

import pytest
import torch

import fusedopt as fo
from conftest import require_op

IGNORE = -100


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _y(*shape, high=5):
    return torch.randint(0, high, shape)


CE_ERRORS = {
    "input_dtype": (dict(input=_x(4, 5).to(torch.int32)), TypeError, "torch.int32"),
    "input_complex": (dict(input=_x(4, 5, dtype=torch.complex64)), TypeError, "complex64"),
    "float64_fp32_backend": (dict(input=_x(4, 5, dtype=torch.float64), backend="cpu"),
                             TypeError, "'cpu' cannot run cross_entropy on float64"),
    "input_not_tensor": (dict(input=[[1.0, 2.0]]), TypeError, "input"),
    "input_0d": (dict(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "0-dim"),
    "no_classes": (dict(input=_x(4, 0)), ValueError, "(4, 0)"),
    "float_class_target": (dict(target=_y(4).float()), TypeError, "torch.float32"),
    "target_dtype": (dict(target=_y(4).to(torch.int16)), TypeError, "torch.int16"),
    "bool_target": (dict(target=torch.zeros(4, dtype=torch.bool)), TypeError, "torch.bool"),
    "target_shape": (dict(target=_y(5)), ValueError, "(5,)"),
    "target_shape_nd": (dict(input=_x(2, 5, 3), target=_y(2, 4)), ValueError, "(2, 5, 3)"),
    "soft_target_shape": (dict(target=torch.rand(4, 6)), ValueError, "(4, 6)"),
    "weight_size": (dict(weight=torch.ones(6)), ValueError, "(6,)"),
    "weight_2d": (dict(weight=torch.ones(1, 5)), ValueError, "(1, 5)"),
    "weight_dtype": (dict(weight=torch.ones(5, dtype=torch.int64)), TypeError, "weight"),
    "weight_device": (dict(weight=torch.ones(5, device="meta")), ValueError, "meta"),
    "target_device": (dict(target=_y(4).to("meta")), ValueError, "meta"),
    "reduction": (dict(reduction="avg"), ValueError, "'avg'"),
    "smoothing_high": (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    "smoothing_negative": (dict(label_smoothing=-0.1), ValueError, "-0.1"),
    "smoothing_type": (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    "z_loss_negative": (dict(z_loss=-1e-4), ValueError, "z_loss"),
    "z_loss_inf": (dict(z_loss=float("inf")), ValueError, "z_loss"),
    "softcap_zero": (dict(softcap=0.0), ValueError, "softcap"),
    "softcap_negative": (dict(softcap=-3.0), ValueError, "-3.0"),
    "ignore_index_type": (dict(ignore_index=1.5), TypeError, "ignore_index"),
    "inplace_type": (dict(inplace_backward=1), TypeError, "inplace_backward"),
    "unknown_backend": (dict(backend="numpy"), ValueError, "'numpy'"),
}


@pytest.mark.parametrize("case", CE_ERRORS)
def test_cross_entropy_errors(case, monkeypatch):
    kwargs, exc, text = CE_ERRORS[case]
    args = dict(input=_x(4, 5), target=_y(4))
    args.update(kwargs)

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before the argument check")

    for name in fo.backends.usable("cross_entropy", "cpu"):
        monkeypatch.setattr(fo.backends._load(name), "cross_entropy_fwd", no_kernel)
    with pytest.raises(exc) as info:
        fo.cross_entropy(args.pop("input"), args.pop("target"), **args)
    assert text in str(info.value), f"message {str(info.value)!r} lacks {text!r}"


FOCAL_ERRORS = {
    "gamma_negative": (dict(gamma=-0.5), ValueError, "-0.5"),
    "gamma_type": (dict(gamma=None), TypeError, "gamma"),
    "alpha_size": (dict(alpha=torch.ones(3)), ValueError, "(3,)"),
    "alpha_type": (dict(alpha="0.25"), TypeError, "alpha"),
    "float_target": (dict(target=_y(4).float()), TypeError, "torch.float32"),
    "soft_target_refused": (dict(target=torch.rand(4, 5)), ValueError, "(4, 5)"),
    "reduction": (dict(reduction="mena"), ValueError, "'mena'"),
    "smoothing": (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
    "input_dtype": (dict(input=_x(4, 5).to(torch.int64)), TypeError, "torch.int64"),
    "float64_fp32_backend": (dict(input=_x(4, 5, dtype=torch.float64), backend="triton"),
                             TypeError, "'triton' cannot run focal_loss on float64"),
    "unknown_backend": (dict(backend="Torch"), ValueError, "'Torch'"),
}


@pytest.mark.parametrize("case", FOCAL_ERRORS)
def test_focal_errors(case):
    kwargs, exc, text = FOCAL_ERRORS[case]
    args = dict(input=_x(4, 5), target=_y(4))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        fo.focal_loss(args.pop("input"), args.pop("target"), **args)
    assert text in str(info.value), f"message {str(info.value)!r} lacks {text!r}"


SIGMOID_ERRORS = {
    "target_shape": (dict(target=torch.rand(4, 6)), ValueError, "(4, 6)"),
    "target_dtype": (dict(target=torch.ones(4, 5, dtype=torch.int64)), TypeError, "torch.int64"),
    "target_device": (dict(target=torch.rand(4, 5, device="meta")), ValueError, "meta"),
    "gamma_negative": (dict(gamma=-1.0), ValueError, "gamma"),
    "alpha_type": (dict(alpha=None), TypeError, "alpha"),
    "reduction": (dict(reduction="max"), ValueError, "'max'"),
    "smoothing": (dict(label_smoothing=-1.0), ValueError, "label_smoothing"),
    "input_dtype": (dict(input=torch.ones(4, 5, dtype=torch.int32)), TypeError, "torch.int32"),
    "float64_fp32_backend": (dict(input=_x(4, 5, dtype=torch.float64),
                                  target=torch.rand(4, 5, dtype=torch.float64), backend="cuda"),
                             TypeError, "'cuda' cannot run sigmoid_focal_loss on float64"),
    "unknown_backend": (dict(backend="gpu"), ValueError, "'gpu'"),
}


@pytest.mark.parametrize("case", SIGMOID_ERRORS)
def test_sigmoid_focal_errors(case):
    kwargs, exc, text = SIGMOID_ERRORS[case]
    args = dict(input=_x(4, 5), target=torch.rand(4, 5))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        fo.sigmoid_focal_loss(args.pop("input"), args.pop("target"), **args)
    assert text in str(info.value), f"message {str(info.value)!r} lacks {text!r}"


@pytest.mark.parametrize("bad", (5, 7, -1, 200))
@pytest.mark.parametrize("op", ("cross_entropy", "focal_loss"))
def test_out_of_range_target_cpu_raises(backend, op, bad):
    require_op(backend, op)
    x = _x(6, 5).requires_grad_()
    y = torch.tensor([0, 1, IGNORE, bad, 4, 2])
    loss = fo.cross_entropy if op == "cross_entropy" else fo.focal_loss
    target_dtype = torch.uint8 if bad == 200 else torch.int64
    y = y.clamp_min(0).to(target_dtype) if bad == 200 else y
    with pytest.raises(IndexError, match=f"target value {bad} is out of range.*< 5"):
        loss(x.cpu(), y, backend=backend)


@pytest.mark.parametrize("op", ("cross_entropy", "focal_loss"))
def test_backend_entry_point_gives_nan_for_bad_targets(backend, op):
    """The entry-point contract (architecture.md): a bad class target gives a NaN row loss
    and a NaN gradient row, never an out-of-bounds access; other rows are unaffected."""
    device = require_op(backend, op)
    module = fo.backends.select(op, device, backend)
    x = _x(4, 5).to(device)
    y = torch.tensor([1, 5, -7, 3], device=device)
    scales = torch.ones(2, device=device)
    if op == "cross_entropy":
        row_loss, grad = module.cross_entropy_fwd(
            x, y, None, scales, ignore_index=IGNORE, label_smoothing=0.1, z_loss=0.0,
            softcap=None, soft_target=False, inplace=False, need_grad=True)
    else:
        row_loss, grad = module.focal_loss_fwd(x, y, None, scales, gamma=2.0,
                                               ignore_index=IGNORE, label_smoothing=0.1,
                                               need_grad=True)
    bad = torch.tensor([False, True, True, False], device=device)
    assert torch.isnan(row_loss[bad]).all() and torch.isfinite(row_loss[~bad]).all()
    assert torch.isnan(grad[bad]).all() and torch.isfinite(grad[~bad]).all()


def _unavailable_backend():
    for name, (ok, reason) in fo.backends.available().items():
        if not ok:
            return name, reason
    pytest.skip("every backend can run here; no unavailable backend to ask for")


def test_unavailable_backend_named_explicitly():
    name, _ = _unavailable_backend()
    with pytest.raises(RuntimeError, match=f"'{name}'"):
        fo.cross_entropy(_x(4, 5), _y(4), backend=name)


def test_env_forces_backend(monkeypatch):
    calls = []
    module = fo.backends._load("torch")
    real = module.cross_entropy_fwd

    def spy(*args, **kwargs):
        calls.append("torch")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "cross_entropy_fwd", spy)
    monkeypatch.setenv("FUSEDOPT_BACKEND", "torch")
    fo.cross_entropy(_x(4, 5), _y(4))
    assert calls == ["torch"]
    name, _ = _unavailable_backend()
    monkeypatch.setenv("FUSEDOPT_BACKEND", name)
    with pytest.raises(RuntimeError, match=f"'{name}'.*FUSEDOPT_BACKEND"):
        fo.cross_entropy(_x(4, 5), _y(4))
    monkeypatch.setenv("FUSEDOPT_BACKEND", "nope")
    with pytest.raises(ValueError, match="'nope'"):
        fo.focal_loss(_x(4, 5), _y(4))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("triton", "cuda", "torch"))
def test_out_of_range_target_cuda(name, monkeypatch):
    """On CUDA a bad target gives NaN without a sync; FUSEDOPT_CHECK=1 raises IndexError."""
    device = require_op(name, "cross_entropy")
    if device.type != "cuda":
        pytest.skip(f"backend {name!r} does not run on CUDA here")
    x = _x(4, 5).to(device)
    y = torch.tensor([0, 9, 1, 2], device=device)
    monkeypatch.delenv("FUSEDOPT_CHECK", raising=False)
    loss = fo.cross_entropy(x, y, reduction="none", backend=name)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    monkeypatch.setenv("FUSEDOPT_CHECK", "1")
    with pytest.raises(IndexError, match="target value 9"):
        fo.cross_entropy(x, y, backend=name)

