"""LossScaler has torch.amp.GradScaler's interface: the same AMP template code runs with
(torch.optim.AdamW, torch.amp.GradScaler) and (FusedAdamW, fo.amp.LossScaler) unchanged
and gives the same params, scales and growth trackers at every step -- with and without
``unscale_`` + ``clip_grad_norm_``, with an overflow, on every backend.  ``step`` passes its
arguments to ``optimizer.step``; misuse raises what GradScaler raises; ``unscale_`` and
the step after it read no device value on the host."""

import pytest
import torch

import fusedopt as fo
from conftest import require_op
from optim_helpers import assert_params_close
from test_errors import _HostSync, _forbid_host_sync

INF = float("inf")


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).to(device)


def _batches(device, steps):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 6, generator=gen).to(device),
             torch.randn(16, 3, generator=gen).to(device)) for _ in range(steps)]


def amp_template(model, opt, scaler, batches, *, clip, overflow_at=None):
    """The usual AMP loop, written once for both scalers; (scale, growth tracker) per step."""
    record = []
    for k, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if k == overflow_at:
            model[0].weight.grad[0, 0] = INF
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        record.append((scaler.get_scale(), scaler._get_growth_tracker()))
    return record


_OPTIMIZERS = {
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
              lambda ps, b: fo.optim.FusedAdamW(ps, lr=1e-2, backend=b)),
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
            lambda ps, b: fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, backend=b)),
}


@pytest.mark.parametrize("kind", sorted(_OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 0.1], ids=["step", "unscale_clip_step"])
def test_amp_template_runs_unchanged_and_matches_grad_scaler(backend, clip, kind):
    device = require_op(backend, "adam")
    batches = _batches(device, 6)
    runs = []
    make_ref, make_fused = _OPTIMIZERS[kind]
    for make_opt, make_scaler in [(make_ref, torch.amp.GradScaler),
                                  (lambda ps: make_fused(ps, backend), fo.amp.LossScaler)]:
        model = _model(device)
        opt = make_opt(model.parameters())
        scaler = make_scaler(device.type, init_scale=2.0**10, growth_interval=2)
        record = amp_template(model, opt, scaler, batches, clip=clip, overflow_at=2)
        runs.append((model, record, scaler.state_dict()))
    (ref, ref_record, ref_state), (ours, record, state) = runs
    assert record == ref_record and state == ref_state
    assert ref_record[2][0] == ref_record[1][0] / 2  # the overflow backed off both
    assert_params_close(list(ours.parameters()), list(ref.parameters()))


def test_unscale_then_step_reads_no_device_value(monkeypatch):
    model = _model("cpu")
    opt = fo.optim.FusedSGD(model.parameters(), lr=0.1, momentum=0.9, backend="torch")
    scaler = fo.amp.LossScaler(init_scale=2.0**8)
    batches = _batches("cpu", 3)
    _forbid_host_sync(monkeypatch)
    for k, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if k == 1:
            model[2].bias.grad[0] = INF
        scaler.unscale_(opt)
        found = scaler.step(opt)
        scaler.update()
        assert found.dim() == 0
    with pytest.raises(_HostSync):
        torch.tensor(1.0).item()  # the guard was on
    monkeypatch.undo()
    assert int(opt.skipped_steps) == 1 and scaler.get_scale() == 2.0**7


class _StepWithArguments(fo.optim.FusedSGD):
    def step(self, closure=None, *, tag=None):
        self.tags.append(tag)
        return super().step(closure)


def test_step_passes_arguments_and_misuse_raises_like_grad_scaler():
    for make_scaler in (lambda: torch.amp.GradScaler("cpu"), lambda: fo.amp.LossScaler("cpu")):
        model = _model("cpu")
        opt = _StepWithArguments(model.parameters(), lr=0.1, backend="cpu")
        opt.tags = []
        scaler = make_scaler()
        x, y = _batches("cpu", 1)[0]
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt, None, tag="first")
        assert opt.tags == ["first"]
        with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
            scaler.step(opt)
        with pytest.raises(RuntimeError, match="unscale_\\(\\) is being called after step"):
            scaler.unscale_(opt)
        scaler.update()
        scaler.unscale_(opt)
        with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
            scaler.unscale_(opt)
        with pytest.raises(RuntimeError, match="Closure use is not"):
            scaler.step(opt, closure=lambda: None)
        scaler.step(opt, tag="second")
        assert opt.tags == ["first", "second"]
        scaler.update(2.0**3)
        assert scaler.get_scale() == 8.0
        scaler.update(torch.tensor(4.0))
        assert scaler.get_scale() == 4.0


def test_grad_scaler_accessors_and_disabled_scaler():
    ours = fo.amp.LossScaler("cpu", init_scale=2.0**5)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**5)
    for scaler in (ours, theirs):
        scaler.set_growth_factor(3.0)
        scaler.set_backoff_factor(0.25)
        scaler.set_growth_interval(7)
        assert (scaler.get_growth_factor(), scaler.get_backoff_factor(),
                scaler.get_growth_interval(), scaler.is_enabled()) == (3.0, 0.25, 7, True)
        assert scaler.get_scale() == 32.0
    assert ours.state_dict() == theirs.state_dict()
    with pytest.raises(ValueError, match="growth_factor"):
        ours.set_growth_factor(1.0)
    assert fo.amp.LossScaler(2.0**6).get_scale() == 64.0  # a number first: the init_scale
    model = _model("cpu")
    opt = fo.optim.FusedAdamW(model.parameters(), lr=1e-2, backend="cpu")
    for scaler in (fo.amp.LossScaler("cpu", enabled=False),
                   torch.amp.GradScaler("cpu", enabled=False)):
        x, y = _batches("cpu", 1)[0]
        loss = torch.nn.functional.mse_loss(model(x), y)
        assert scaler.scale(loss) is loss and not scaler.is_enabled()
        loss.backward()
        scaler.unscale_(opt)
        assert scaler.step(opt) is None
        scaler.update()
        assert scaler.state_dict() == {} and scaler.get_scale() == 1.0
        scaler.load_state_dict({"scale": 2.0})  # a no-op on a disabled scaler, as torch's


def test_load_state_dict_checks_every_value_before_setting_any():
    """GradScaler's state dicts load (numbers, or one-element tensors); a missing key, a
    value of the wrong type or outside the constructor's ranges is refused by name, and the
    refused load leaves the scaler as it was."""
    torch_sd = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3).state_dict()
    scaler = fo.amp.LossScaler(init_scale=2.0 ** 10)
    scaler.load_state_dict(torch_sd)
    assert scaler.get_scale() == 8.0 and scaler.get_growth_interval() == 3
    scaler.load_state_dict({k: torch.tensor(v) for k, v in torch_sd.items()})
    assert scaler.get_scale() == 8.0
    scaler.scale(torch.ones(()))
    before = scaler.state_dict()
    for edit, error, match in (
            (dict(scale=None), TypeError, "'scale' must be a number"),
            (dict(scale=-1.0), ValueError, r"invalid scale: -1\.0"),
            (dict(scale=float("nan")), ValueError, "invalid scale: nan"),
            (dict(growth_factor=0.5), ValueError, "invalid growth_factor"),
            (dict(backoff_factor=1.0), ValueError, "invalid backoff_factor"),
            (dict(growth_interval=2.5), ValueError, "invalid growth_interval: 2.5"),
            (dict(growth_interval=0), ValueError, "invalid growth_interval: 0"),
            (dict(_growth_tracker=-1), ValueError, "invalid _growth_tracker"),
            (dict(scale=torch.ones(2)), TypeError, "one-element real tensor"),
            (dict(scale=torch.ones((), device="meta")), TypeError, "on meta"),
            (dict(scale="big"), TypeError, "'scale' must be a number")):
        with pytest.raises(error, match=match):
            scaler.load_state_dict(dict(torch_sd, **edit))
        assert scaler.state_dict() == before
    with pytest.raises(ValueError, match=r"lacks \['growth_interval'\]"):
        scaler.load_state_dict({k: v for k, v in torch_sd.items() if k != "growth_interval"})
    with pytest.raises(TypeError, match="must be a dict"):
        scaler.load_state_dict([1.0])
    assert scaler.state_dict() == before
