"""Bad arguments are refused at construction with messages naming the argument and value;
sparse gradients are refused before anything changes; step() never syncs the host."""

import pytest
import torch

import fusedopt as fo
from conftest import HAS_CUDA, require_op
from optim_helpers import make_grads, make_params, set_grads, snapshot, assert_bit_identical

ADAM_CASES = [
    (dict(lr=-1e-3), ValueError, r"lr: -0\.001"),
    (dict(lr=torch.tensor(-0.5)), ValueError, r"lr: -0\.5"),
    (dict(lr="fast"), TypeError, r"lr must be a number, got 'fast'"),
    (dict(lr=torch.tensor([0.1, 0.2])), TypeError, r"lr as a tensor must have one"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]: 1\.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]: -0\.1"),
    (dict(betas=0.9), TypeError, r"betas must be a pair"),
    (dict(eps=-1e-8), ValueError, r"eps: -1e-08"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay: -0\.1"),
    (dict(max_grad_norm=0.0), ValueError, r"max_grad_norm: 0\.0"),
    (dict(max_grad_norm=-1.0), ValueError, r"max_grad_norm: -1\.0"),
    (dict(max_grad_norm=float("nan")), ValueError, r"max_grad_norm: nan"),
    (dict(amsgrad=1), TypeError, r"amsgrad must be a bool, got 1"),
    (dict(master_weights="yes"), TypeError, r"master_weights must be a bool"),
    (dict(backend="gpu"), ValueError, r"unknown backend 'gpu'"),
]


@pytest.mark.parametrize("kwargs,exc,match", ADAM_CASES, ids=lambda x: str(x)[:40] if isinstance(x, dict) else "")
@pytest.mark.parametrize("cls", [fo.optim.FusedAdam, fo.optim.FusedAdamW])
def test_adam_arguments(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(make_params(), **kwargs)


SGD_CASES = [
    (dict(lr=-0.1), ValueError, r"lr: -0\.1"),
    (dict(momentum=-0.9), ValueError, r"momentum: -0\.9"),
    (dict(weight_decay=-1.0), ValueError, r"weight_decay: -1\.0"),
    (dict(nesterov=True), ValueError, r"nesterov=True requires momentum > 0 and dampening == 0, got momentum=0\.0"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, r"dampening=0\.1"),
    (dict(dampening=float("inf")), ValueError, r"dampening: inf"),
    (dict(max_grad_norm=0), ValueError, r"max_grad_norm: 0\.0"),
    (dict(maximize=None), TypeError, r"maximize must be a bool"),
]


@pytest.mark.parametrize("kwargs,exc,match", SGD_CASES, ids=lambda x: str(x)[:40] if isinstance(x, dict) else "")
def test_sgd_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fo.optim.FusedSGD(make_params(), **kwargs)


def test_group_overrides_are_checked_too():
    ps = make_params()
    with pytest.raises(ValueError, match=r"lr: -2\.0"):
        fo.optim.FusedAdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": -2.0}])
    opt = fo.optim.FusedSGD(ps[:2], lr=0.1)
    with pytest.raises(ValueError, match=r"momentum: -1\.0"):
        opt.add_param_group({"params": ps[2:], "momentum": -1.0})
    assert len(opt.param_groups) == 1


def test_params_must_be_a_trained_dtype_and_dense():
    with pytest.raises(TypeError, match=r"dtype torch\.int64"):
        fo.optim.FusedAdamW([torch.zeros(3, dtype=torch.int64)])
    strided = torch.zeros(4, 6)[:, ::2].requires_grad_()
    with pytest.raises(ValueError, match=r"strides \(6, 2\)"):
        fo.optim.FusedSGD([strided])
    opt = fo.optim.FusedSGD(make_params()[:1])
    with pytest.raises(TypeError, match="int32"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int32)]})
    assert len(opt.param_groups) == 1
    channels_last = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    fo.optim.FusedAdamW([channels_last])  # dense in another dim order: accepted


def test_explicit_backend_that_cannot_run_names_it():
    if HAS_CUDA:
        pytest.skip("a CUDA device is present here: backend 'cuda' can run")
    with pytest.raises(RuntimeError, match=r"'cuda'"):
        fo.optim.FusedAdamW(make_params(), backend="cuda")


def test_sparse_gradient_is_refused_before_anything_changes():
    ps = make_params()
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, backend="torch")
    set_grads(ps, make_grads(steps=1)[0])
    opt.step()
    set_grads(ps, make_grads(steps=1, seed=9)[0])
    ps[2].grad = ps[2].grad.to_sparse()
    before = snapshot(opt, ps)
    with pytest.raises(TypeError, match="does not support torch.sparse_coo gradients"):
        opt.step()
    assert_bit_identical(before, snapshot(opt, ps))


def test_loss_scaler_arguments_and_misuse():
    for kwargs, match in [(dict(init_scale=0.0), r"init_scale: 0\.0"),
                          (dict(growth_factor=1.0), r"growth_factor: 1\.0"),
                          (dict(backoff_factor=1.0), r"backoff_factor: 1\.0"),
                          (dict(growth_interval=0), r"growth_interval: 0")]:
        with pytest.raises(ValueError, match=match):
            fo.amp.LossScaler(**kwargs)
    scaler = fo.amp.LossScaler()
    opt = fo.optim.FusedSGD(make_params(), backend="torch")
    with pytest.raises(RuntimeError, match="before LossScaler.scale"):
        scaler.step(opt)
    scaler.scale(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="without a LossScaler.step"):
        scaler.update()


class _HostSync(RuntimeError):
    pass


def _forbid_host_sync(monkeypatch):
    """Make every Python-level read of a tensor value raise (construction may read)."""
    def refuse(*args, **kwargs):
        raise _HostSync("host read of a device value inside step()")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_step_never_reads_device_values(monkeypatch):
    ps = make_params()
    ps[1] = ps[1].detach().bfloat16().requires_grad_()
    ps[3] = ps[3].detach().half().requires_grad_()
    lr = torch.tensor(1e-2)
    adam = fo.optim.FusedAdamW([{"params": ps[:2], "lr": lr}, {"params": ps[2:], "amsgrad": True}],
                               betas=(torch.tensor(0.9), 0.99), max_grad_norm=1.0, skip_nonfinite=True,
                               master_weights=True, backend="torch")
    sgd_params = make_params(seed=4)
    sgd = fo.optim.FusedSGD(sgd_params, lr=lr, momentum=0.9, nesterov=True, max_grad_norm=0.5,
                            track_grad_norm=True, backend="torch")
    scaler = fo.amp.LossScaler(init_scale=2.0**8, growth_interval=1)
    _forbid_host_sync(monkeypatch)
    for k, grads in enumerate(make_grads(steps=3)):
        loss = scaler.scale(torch.tensor(1.0))
        if k == 1:
            grads[0][0, 0] = float("inf")
        set_grads(ps, grads)
        set_grads(sgd_params, grads)
        scaler.step(adam)
        scaler.step(sgd)
        scaler.update()
        adam.step()  # without a scaler, skip_nonfinite on
        assert loss.dtype == torch.float32
    monkeypatch.undo()
    assert scaler.get_scale() == 2.0**9  # 2^8: grown, backed off, grown
    assert adam.skipped_steps.item() == 2


def test_meta_params_construct_but_are_refused_at_step(backend):
    require_op(backend, "adam")
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = fo.optim.FusedAdamW(model.parameters(), backend=backend)  # deferred init is fine
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="param 0 of param group 0 is on the meta device"):
        opt.step()
    assert len(opt.state) == 0


def test_cpu_tensor_hyper_parameters_are_read_on_the_host_for_accelerator_params(monkeypatch):
    """A CPU tensor lr/beta for params on an accelerator is read on the host at each step (a
    memory load, as torch's fused optimizers do), never copied with a blocking .to()."""
    from fusedopt.optim._scalars import hyper

    def no_copy(*args, **kwargs):
        raise AssertionError("a blocking copy of a hyper-parameter")

    lr = torch.tensor(0.25)
    monkeypatch.setattr(torch.Tensor, "to", no_copy)
    value = hyper(lr, torch.device("cuda", 0))
    assert type(value) is float and value == 0.25
    lr.fill_(0.5)  # changed in place: the next step reads the new value
    assert hyper(lr, torch.device("cuda", 0)) == 0.5
    assert hyper(torch.tensor([0.125]), torch.device("cuda", 1)) == 0.125
    assert hyper(lr, torch.device("cpu")) is lr  # read by the CPU kernel itself
    monkeypatch.undo()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_cpu_tensor_lr_and_betas_with_cuda_params(backend):
    require_op(backend, "adam")
    ours = make_params(device="cuda")
    ref = [p.detach().clone().requires_grad_() for p in ours]
    lr, betas = torch.tensor(0.02), (torch.tensor(0.9), torch.tensor(0.99))
    opt = fo.optim.FusedAdamW(ours, lr=lr, betas=betas, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=0.02, betas=(0.9, 0.99), foreach=False)
    for k, grads in enumerate(make_grads(steps=4)):
        set_grads(ours, grads)
        set_grads(ref, grads)
        opt.step()
        ref_opt.step()
        lr.mul_(0.5)  # in place: used from the next step on
        ref_opt.param_groups[0]["lr"] = float(lr)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_group_values_set_after_construction_are_refused_before_anything_runs(backend):
    device = require_op(backend, "adam")
    ps = make_params(device=device)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, max_grad_norm=1.0, backend=backend)
    set_grads(ps, make_grads(steps=1)[0])
    opt.step()
    for key, value, exc, match in [("lr", "fast", TypeError, "lr must be a number"),
                                   ("lr", torch.tensor([0.1, 0.2]), TypeError, "one-element"),
                                   ("betas", (0.9, torch.tensor([1, 2])), TypeError, r"betas\[1\]"),
                                   ("eps", None, TypeError, "eps must be a number, got None"),
                                   ("weight_decay", "0.1", TypeError,
                                    "weight_decay must be a number, got '0.1'")]:
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        before = snapshot(opt, ps) + [opt.last_grad_norm.clone()]
        with pytest.raises(exc, match=match):
            opt.step()
        assert_bit_identical(before, snapshot(opt, ps) + [opt.last_grad_norm])
        opt.param_groups[0][key] = good
    opt.step()
    sgd = fo.optim.FusedSGD(ps, lr=1e-2, momentum=0.9, backend=backend)
    sgd.step()
    sgd.param_groups[0]["momentum"] = [0.9]
    before = snapshot(sgd, ps)
    with pytest.raises(TypeError, match=r"momentum must be a number, got \[0\.9\]"):
        sgd.step()
    assert_bit_identical(before, snapshot(sgd, ps))
