"""The loss kernel boundary (fusedopt/backends/_loss_boundary.py): the `cpu` and `cuda`
launchers (_loss_launch.py) and the `triton` launchers verify every tensor before a kernel
runs -- exact type, device, dtype, shape, the strides the kernel walks -- and refuse the
rest with a TypeError/ValueError naming the argument; no kernel is launched then. A
dimension of size 1 may have any stride. The `cuda` launcher is checked with a stand-in
module (these refusals happen before anything reaches a device)."""

import subprocess
import sys

import pytest
import torch

from _subprocess import OUTSIDE, package_env
from fusedopt import backends
from fusedopt.backends._loss_launch import LossLauncher

ENTRIES = ["cpu", "triton"]


class Tagged(torch.Tensor):
    """A tensor subclass (as a user or a framework might define one)."""


class NoKernel:
    """Stands for a compiled module or a Triton kernel: fails the test if called."""

    SIGMOID_FOCAL_SPAN = 4096

    def __getattr__(self, name):
        raise AssertionError(f"kernel {name} reached with a refused input")

    def __getitem__(self, grid):
        raise AssertionError("a Triton kernel was launched with a refused input")


def _module(entry, monkeypatch, block_kernels):
    ok, reason = backends.status(entry)
    if not ok:
        pytest.skip(f"backend {entry!r} cannot run here: {reason}")
    if entry == "triton" and torch.cuda.is_available():
        pytest.skip("the boundary tests use CPU tensors: Triton runs them only when interpreted")
    module = backends._load(entry)
    if block_kernels:
        if entry == "cpu":
            from fusedopt.backends.cpu import losses
            monkeypatch.setattr(losses._launch, "ext", NoKernel())
        else:
            from fusedopt.backends.triton import cross_entropy, focal
            for mod, name in ((cross_entropy, "_cross_entropy_kernel"),
                              (focal, "_focal_kernel"), (focal, "_sigmoid_focal_kernel")):
                monkeypatch.setattr(mod, name, NoKernel())
    return module


def _good():
    gen = torch.Generator().manual_seed(0)
    return dict(logits=torch.randn(4, 6, generator=gen), target=torch.tensor([0, 5, -100, 2]),
                weight=torch.rand(6, generator=gen) + 0.5, scales=torch.ones(2))


def _ce(module, logits, target, weight, scales, soft=False, **kw):
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=None,
                soft_target=soft, inplace=False, need_grad=True)
    opts.update(kw)
    return module.cross_entropy_fwd(logits, target, weight, scales, **opts)


def _big(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


CE_REFUSED = {
    "logits_subclass": (dict(logits=_big(4, 6).as_subclass(Tagged)), TypeError, "logits"),
    "target_subclass": (dict(target=torch.tensor([0, 5, 1, 2]).as_subclass(Tagged)), TypeError,
                        "target"),
    "weight_subclass": (dict(weight=torch.ones(6).as_subclass(Tagged)), TypeError, "weight"),
    "scales_subclass": (dict(scales=torch.ones(2).as_subclass(Tagged)), TypeError, "scales"),
    "logits_float64": (dict(logits=_big(4, 6).double()), TypeError, "float64"),
    "logits_3d": (dict(logits=_big(4, 6, 1)), ValueError, "(4, 6, 1)"),
    "logits_column_stride": (dict(logits=_big(4, 12)[:, ::2]), ValueError, "strides"),
    "logits_overlapping_rows": (dict(logits=_big(30).as_strided((4, 6), (3, 1))), ValueError,
                                "stride(0) >= C"),
    "logits_meta": (dict(logits=torch.empty(4, 6, device="meta")), ValueError, "meta"),
    "logits_negated_view": (dict(logits=torch._neg_view(_big(4, 6))), ValueError, "resolve_neg"),
    "logits_sparse": (dict(logits=_big(4, 6).to_sparse()), ValueError, "sparse"),
    "target_int16": (dict(target=torch.zeros(4, dtype=torch.int16)), TypeError, "int16"),
    "target_shape": (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "(5,)"),
    "target_strided": (dict(target=torch.zeros(8, dtype=torch.long)[::2]), ValueError, "(2,)"),
    "target_meta": (dict(target=torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
                    "meta"),
    "weight_float64": (dict(weight=torch.ones(6, dtype=torch.float64)), ValueError, "float64"),
    "weight_size": (dict(weight=torch.ones(7)), ValueError, "(7,)"),
    "weight_strided": (dict(weight=torch.ones(12)[::2]), ValueError, "(2,)"),
    "scales_size": (dict(scales=torch.ones(3)), ValueError, "(3,)"),
    "scales_float64": (dict(scales=torch.ones(2, dtype=torch.float64)), ValueError, "float64"),
    "ignore_index_int64": (dict(ignore_index=2 ** 63), ValueError, "ignore_index"),
    "softcap_zero_in_fp32": (dict(softcap=1e-50), ValueError, "softcap"),
    "z_loss_inf_in_fp32": (dict(z_loss=1e39), ValueError, "z_loss"),
}


@pytest.mark.parametrize("case", CE_REFUSED)
@pytest.mark.parametrize("entry", ENTRIES)
def test_cross_entropy_refusals(entry, case, monkeypatch):
    module = _module(entry, monkeypatch, block_kernels=True)
    changes, exc, text = CE_REFUSED[case]
    changes = dict(changes)
    args = _good()
    kw = {k: changes.pop(k) for k in ("ignore_index", "softcap", "z_loss") if k in changes}
    args.update(changes)
    with pytest.raises(exc) as info:
        _ce(module, args["logits"], args["target"], args["weight"], args["scales"], **kw)
    assert "cross_entropy_fwd" in str(info.value) and text in str(info.value), str(info.value)


SOFT_REFUSED = {
    "dtype": (torch.softmax(_big(4, 6), 1).bfloat16(), "bfloat16"),
    "shape": (torch.softmax(_big(4, 7), 1), "(4, 7)"),
    "column_stride": (torch.softmax(_big(4, 12), 1)[:, ::2], "strides"),
    "subclass": (torch.softmax(_big(4, 6), 1).as_subclass(Tagged), "Tagged"),
}


@pytest.mark.parametrize("case", SOFT_REFUSED)
@pytest.mark.parametrize("entry", ENTRIES)
def test_soft_target_refusals(entry, case, monkeypatch):
    module = _module(entry, monkeypatch, block_kernels=True)
    target, text = SOFT_REFUSED[case]
    args = _good()
    with pytest.raises((TypeError, ValueError), match=r"target.*") as info:
        _ce(module, args["logits"], target, args["weight"], args["scales"], soft=True)
    assert text in str(info.value), str(info.value)


def _same_results(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("entry", ENTRIES)
def test_parameters_and_any_stride_of_size_one_dims_accepted(entry, monkeypatch):
    module = _module(entry, monkeypatch, block_kernels=False)
    args = _good()
    plain = _ce(module, **args)
    as_params = _ce(module, torch.nn.Parameter(args["logits"].clone(), requires_grad=False),
                    args["target"], torch.nn.Parameter(args["weight"], requires_grad=False),
                    args["scales"])
    _same_results(as_params, plain)
    # (N, 1) transposed, (1, C) broadcast rows, one-element target and weight with odd strides
    column = _big(1, 5).t()
    y0 = torch.zeros(5, dtype=torch.long)
    _same_results(_ce(module, column, y0, torch.ones(20)[::20], args["scales"]),
                  _ce(module, column.contiguous(), y0, torch.ones(1), args["scales"]))
    row = _big(6).expand(1, 6)
    one = torch.tensor([3, 9])[:1]
    _same_results(_ce(module, row, one, args["weight"], args["scales"]),
                  _ce(module, row.contiguous(), one.contiguous(), args["weight"], args["scales"]))
    # soft targets with strided rows
    q = torch.softmax(_big(4, 10), 1)[:, :6]
    _same_results(_ce(module, args["logits"], q, args["weight"], args["scales"], soft=True),
                  _ce(module, args["logits"], q.contiguous(), args["weight"], args["scales"],
                      soft=True))


_FREED_STORAGE = r"""
import sys, torch
from fusedopt import backends
module = backends._load(sys.argv[1])
x = torch.randn(10, 6)
view = x[2:]
x.untyped_storage().resize_(0)  # view now spans 0 bytes; reading it would fault
try:
    module.cross_entropy_fwd(view, torch.zeros(8, dtype=torch.long), None, torch.ones(2),
                             ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                             soft_target=False, inplace=False, need_grad=True)
except ValueError as exc:
    print(exc)
"""


@pytest.mark.parametrize("entry", ENTRIES)
def test_freed_storage_refused(entry, monkeypatch):
    """A view whose storage was resized to 0 (as FSDP does to free memory): refused from its
    metadata. Run in a subprocess, so a miss is a failed test, not a crashed run."""
    _module(entry, monkeypatch, block_kernels=False)
    run = subprocess.run([sys.executable, "-c", _FREED_STORAGE, entry], capture_output=True,
                         text=True, timeout=120, env=package_env(), cwd=OUTSIDE)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-500:]}"
    assert "logits reaches past the end of its storage" in run.stdout, run.stdout + run.stderr


FOCAL_REFUSED = {
    "logits_subclass": (dict(logits=_big(4, 6).as_subclass(Tagged)), TypeError, "logits"),
    "alpha_subclass": (dict(alpha=torch.ones(6).as_subclass(Tagged)), TypeError, "alpha"),
    "alpha_size": (dict(alpha=torch.ones(5)), ValueError, "(5,)"),
    "target_uint16": (dict(target=torch.zeros(4, dtype=torch.uint16)), TypeError, "uint16"),
    "gamma_inf_in_fp32": (dict(gamma=1e39), ValueError, "gamma"),
}


@pytest.mark.parametrize("case", FOCAL_REFUSED)
@pytest.mark.parametrize("entry", ENTRIES)
def test_focal_refusals(entry, case, monkeypatch):
    module = _module(entry, monkeypatch, block_kernels=True)
    changes, exc, text = FOCAL_REFUSED[case]
    args = dict(_good(), alpha=torch.ones(6), gamma=2.0)
    args.update(changes)
    with pytest.raises(exc) as info:
        module.focal_loss_fwd(args["logits"], args["target"], args["alpha"], args["scales"],
                              gamma=args["gamma"], ignore_index=-100, label_smoothing=0.0,
                              need_grad=True)
    assert "focal_loss_fwd" in str(info.value) and text in str(info.value), str(info.value)


SIGMOID_REFUSED = {
    "logits_subclass": (dict(logits=_big(4, 6).as_subclass(Tagged)), TypeError, "logits"),
    "target_subclass": (dict(target=torch.rand(4, 6).as_subclass(Tagged)), TypeError, "target"),
    "non_contiguous": (dict(logits=_big(6, 4).t()), ValueError, "contiguous"),
    "dtype_mismatch": (dict(target=torch.rand(4, 6).half()), ValueError, "float16"),
    "scales_size": (dict(scales=torch.ones(1)), ValueError, "scales"),
}


@pytest.mark.parametrize("case", SIGMOID_REFUSED)
@pytest.mark.parametrize("entry", ENTRIES)
def test_sigmoid_focal_refusals(entry, case, monkeypatch):
    module = _module(entry, monkeypatch, block_kernels=True)
    changes, exc, text = SIGMOID_REFUSED[case]
    args = dict(logits=_big(4, 6), target=torch.rand(4, 6), scales=torch.ones(2))
    args.update(changes)
    with pytest.raises(exc) as info:
        module.sigmoid_focal_loss_fwd(args["logits"], args["target"], args["scales"],
                                      alpha=0.25, gamma=2.0, label_smoothing=0.0, reduce=True,
                                      need_grad=True)
    assert text in str(info.value), str(info.value)


def test_cpu_scale_grad_refusals(monkeypatch):
    module = _module("cpu", monkeypatch, block_kernels=True)
    with pytest.raises(TypeError, match="scale_grad_: grad is a Tagged; compiled kernels take plain"):
        module.scale_grad_(torch.ones(4, 6).as_subclass(Tagged), torch.tensor(2.0))
    with pytest.raises(ValueError, match="grad must be contiguous"):
        module.scale_grad_(torch.ones(6, 4).t(), torch.tensor(2.0))
    with pytest.raises(ValueError, match="scale must be one fp32 value"):
        module.scale_grad_(torch.ones(4, 6), torch.ones(2))


def test_cuda_launcher_refuses_host_tensors():
    """The cuda module would get host addresses: refused before the stand-in is touched."""
    launcher = LossLauncher(NoKernel(), lambda tensor, option: 0, lambda status, name: None,
                            device_type="cuda")
    args = _good()
    with pytest.raises(ValueError, match="cross_entropy_fwd: logits is on cpu; this backend "
                                         "runs on cuda tensors"):
        _ce(launcher, **args)
    with pytest.raises(ValueError, match="focal_loss_fwd: logits is on cpu"):
        launcher.focal_loss_fwd(args["logits"], args["target"], None, args["scales"], gamma=2.0,
                                ignore_index=-100, label_smoothing=0.0, need_grad=True)
    with pytest.raises(ValueError, match="sigmoid_focal_loss_fwd: logits is on cpu"):
        launcher.sigmoid_focal_loss_fwd(args["logits"], torch.rand(4, 6), args["scales"],
                                        alpha=0.25, gamma=2.0, label_smoothing=0.0, reduce=True,
                                        need_grad=True)
    with pytest.raises(ValueError, match="scale_grad_: grad is on cpu"):
        launcher.scale_grad_(torch.ones(3), torch.tensor(2.0))


@pytest.mark.gpu
def test_cuda_launcher_refuses_mixed_devices():
    ok, reason = backends.status("cuda")
    if not ok:
        pytest.skip(f"backend 'cuda' cannot run here: {reason}")
    from fusedopt.backends import cuda as module
    args = {k: v.cuda() for k, v in _good().items()}
    for name in ("target", "weight", "scales"):
        bad = dict(args, **{name: args[name].cpu()})
        with pytest.raises(ValueError, match=f"{name} is on cpu, expected cuda"):
            _ce(module, **bad)
    column = args["logits"][:1].t()  # (6, 1) with strides (1, 6): any stride for size 1
    y0 = torch.zeros(6, dtype=torch.long, device="cuda")
    loss, grad = _ce(module, column, y0, None, args["scales"], label_smoothing=0.2)
    assert not loss.any() and not grad.any()
