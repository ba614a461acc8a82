"""Property-based tests of the losses' public API on every backend that runs here: for any
input hypothesis draws (strategies.py), fusedopt's loss and gradient equal PyTorch's in
float64 (F.cross_entropy, the focal formulas) within the precision the kernels compute in
(references.py), or the call raises IndexError for a class target outside [0, C) -- and
nothing else.  Every call runs in the worker process (worker.py): a crash fails the example.

Profiles and the deep run: tests/fuzz/fuzz_setup.py, docs/trust.md."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import references as ref
import strategies as strat
from conftest import require_op
from fuzz_setup import examples, worker  # noqa: F401  (worker: the fixture)

CLEAN_ERRORS = ("TypeError", "ValueError", "IndexError")


def _bad_class_target(result_or_spec_target, ignore_index, n_classes):
    y = result_or_spec_target.long().reshape(-1)
    return bool(((y != ignore_index) & ((y < 0) | (y >= n_classes))).any())


def _run(worker, name, spec):
    out = worker.call(name, spec)
    if out[0] == "raised":
        return None, out[1], out[2]
    return out[1], None, None


def _expected_target_error(spec, n_classes, ignore_index, target_dtype="int64"):
    """Whether the target the worker builds holds an out-of-range class (IndexError)."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from build import tensor
    from cases_losses import class_target

    x = tensor(spec["input"], spec["seed"])
    shape = tuple(x.shape)
    class_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    y = class_target(spec, class_shape, n_classes, ignore_index)
    return _bad_class_target(y, ignore_index, n_classes)


def _scale_rows(mag, reduction, denominator, g_out):
    if reduction == "none":
        return mag.reshape(g_out.shape) * g_out.double().abs()
    d = denominator if reduction == "mean" else 1.0
    return mag * (abs(float(g_out)) / d if d else 0.0)


def _check_loss(spec, result, want, x64, mags, dtype, reduction, denominator,
                loss_dtype=None, infinite_rows=None):
    loss_mag, grad_mag, logp_mag = mags
    got = result["loss"]
    if reduction == "none":
        tol = ref.K * ref.EPS32 * loss_mag.reshape(want.shape) + 1e-30
    else:
        d = denominator if reduction == "mean" else 1.0
        tol = ref.K * ref.EPS32 * loss_mag.sum() / d + 1e-30 if d else torch.tensor(math.inf)
    ref.assert_matches(got, want, tol, loss_dtype or dtype, "loss")
    if result["grad"] is None:
        return
    g_out = result["grad_output"]
    (want_grad,) = torch.autograd.grad(want, x64, g_out.double())
    row_tol = ref.K * ref.EPS32 * logp_mag * grad_mag
    row_tol = _scale_rows(row_tol, reduction, denominator, g_out) if reduction != "none" else \
        row_tol * g_out.double().abs().reshape(-1)
    grad_rows = ref.to_rows(want_grad)
    tol = row_tol.reshape(-1, 1).expand_as(grad_rows) + 1e-30
    got_rows = ref.to_rows(result["grad"])
    # An ignored row's gradient is 0 whatever its logits (torch's is NaN where they are all
    # -inf: its log_softmax backward multiplies the row's NaN by the zero grad_output).
    if not result["target"].is_floating_point():
        ignored = result["target"].reshape(-1).long() == spec["kwargs"]["ignore_index"]
        grad_rows = torch.where(ignored[:, None], 0.0, grad_rows)
    if infinite_rows is not None:
        # a row whose loss is infinite: the kernels give the gradient's finite limit, torch's
        # autograd through the formula NaN (0 * inf); not compared
        grad_rows = torch.where(infinite_rows[:, None], 0.0, grad_rows)
        got_rows = torch.where(infinite_rows[:, None], 0.0, got_rows)
    ref.assert_matches(got_rows, grad_rows, tol, dtype, "grad", roundings=2)


def _denominator(result, spec, kw, n_classes):
    if spec.get("soft"):
        return float(ref.to_rows(result["x"]).shape[0]) if result["x"].dim() > 1 else 1.0
    y = result["target"].reshape(-1).long()
    valid = y != kw["ignore_index"]
    w = result.get("weight")
    if w is None or w.dim() == 0:
        return float(valid.sum())
    return float(torch.where(valid, w.double()[y.clamp(0, n_classes - 1)], 0.0).sum())


@given(data=st.data())
@settings(max_examples=examples(25))
def test_cross_entropy_matches_torch(worker, backend, data):
    require_op(backend, "cross_entropy")
    spec = data.draw(strat.cross_entropy_spec(backend))
    kw = spec["kwargs"]
    result, error, message = _run(worker, "cross_entropy", spec)
    shape = spec["input"]["shape"]
    n_classes = shape[1] if len(shape) >= 2 else shape[0]
    if not spec["soft"] and _expected_target_error(spec, n_classes, kw["ignore_index"]):
        assert error == "IndexError", (error, message)
        return
    assert error is None, f"{error}: {message}"
    want, x64 = ref.cross_entropy(result["x"], result["target"], result["weight"],
                                  **{k: v for k, v in kw.items() if k != "backend"})
    mags = ref.row_magnitudes(result["x"], result["target"], result["weight"],
                              ignore_index=kw["ignore_index"],
                              label_smoothing=kw["label_smoothing"], z_loss=kw["z_loss"],
                              softcap=kw["softcap"])
    _check_loss(spec, result, want, x64, mags, result["x"].dtype, kw["reduction"],
                _denominator(result, spec, kw, n_classes))


def focal_reference(x, target, alpha, gamma, ignore_index, reduction, label_smoothing):
    x64 = x.detach().double().requires_grad_()
    rows = ref.to_rows(x64)
    n_classes = rows.shape[1]
    y = target.reshape(-1).long()
    valid = y != ignore_index
    q = torch.zeros_like(rows)
    q[valid, y[valid]] = 1.0
    q = (1 - label_smoothing) * q + label_smoothing / n_classes
    logp = torch.log_softmax(rows, dim=1)
    u = -torch.expm1(logp)
    a = torch.ones(n_classes, dtype=torch.float64) if alpha is None else (
        alpha.double() if isinstance(alpha, torch.Tensor) else torch.full((n_classes,), alpha,
                                                                          dtype=torch.float64))
    aq = a * q
    # terms with a_c q_c = 0 are 0 (also at a -inf logit); masked before any product, so no
    # NaN reaches their (zero) gradient -- but a NaN log p (a row of all -inf logits) stays
    terms = aq * u.pow(gamma) * torch.where((aq == 0) & ~torch.isnan(logp), 0.0, logp)
    loss = torch.where(valid, -terms.sum(1), 0.0)
    if reduction == "none":
        return loss.reshape(target.shape), x64
    if reduction == "sum":
        return loss.sum(), x64
    return loss.sum() / valid.sum(), x64


@given(data=st.data())
@settings(max_examples=examples(15))
def test_focal_loss_matches_formula(worker, backend, data):
    require_op(backend, "focal_loss")
    spec = data.draw(strat.focal_spec(backend))
    kw = spec["kwargs"]
    result, error, message = _run(worker, "focal_loss", spec)
    shape = spec["input"]["shape"]
    n_classes = shape[1] if len(shape) >= 2 else shape[0]
    if _expected_target_error(spec, n_classes, kw["ignore_index"]):
        assert error == "IndexError", (error, message)
        return
    assert error is None, f"{error}: {message}"
    alpha = result["weight"] if result["weight"] is not None else kw.get("alpha")
    want, x64 = focal_reference(result["x"], result["target"], alpha, kw["gamma"],
                                kw["ignore_index"], kw["reduction"], kw["label_smoothing"])
    weight = alpha if isinstance(alpha, torch.Tensor) else (
        None if alpha is None else torch.full((n_classes,), float(alpha)))
    loss_mag, grad_mag, logp_mag = ref.row_magnitudes(
        result["x"], result["target"], weight, ignore_index=kw["ignore_index"],
        label_smoothing=kw["label_smoothing"])
    mags = (loss_mag, grad_mag * (1 + kw["gamma"]) * logp_mag, logp_mag)
    y = result["target"].reshape(-1).long()
    denominator = float((y != kw["ignore_index"]).sum())
    rows, _ = focal_reference(result["x"], result["target"], alpha, kw["gamma"],
                              kw["ignore_index"], "none", kw["label_smoothing"])
    _check_loss(spec, result, want, x64, mags, result["x"].dtype, kw["reduction"], denominator,
                infinite_rows=torch.isinf(rows.detach()).reshape(-1))


def sigmoid_focal_reference(x, t, alpha, gamma, reduction, label_smoothing):
    x64 = x.detach().double().requires_grad_()
    tp = t.double() * (1 - label_smoothing) + label_smoothing / 2
    p = torch.sigmoid(x64)
    ce = F.binary_cross_entropy_with_logits(x64, tp, reduction="none")
    p_t = p * tp + (1 - p) * (1 - tp)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * tp + (1 - alpha) * (1 - tp))
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss, x64


@given(data=st.data())
@settings(max_examples=examples(12))
def test_sigmoid_focal_loss_matches_torchvision(worker, backend, data):
    require_op(backend, "sigmoid_focal_loss")
    spec = data.draw(strat.sigmoid_focal_spec(backend))
    kw = spec["kwargs"]
    result, error, message = _run(worker, "sigmoid_focal_loss", spec)
    assert error is None, f"{error}: {message}"
    x = result["x"]
    finite = torch.isfinite(x)
    if not finite.all() and kw["reduction"] != "none":
        return  # torch's formula gives NaN at +-inf logits where the limit is 0 or inf
    want, x64 = sigmoid_focal_reference(x, result["target"], kw["alpha"], kw["gamma"],
                                        kw["reduction"], kw["label_smoothing"])
    if not finite.all():  # compare the elements of finite logits only
        result = dict(result, loss=torch.where(finite, result["loss"], 0.0),
                      grad=None if result["grad"] is None else
                      torch.where(finite, result["grad"], 0.0))
        want = torch.where(finite, want, 0.0)
    # per element: |loss| <~ |balance|*(|x| + 1), its gradient <~ |balance|*(1 + gamma)
    balance = max(1.0, abs(kw["alpha"]) + abs(1 - kw["alpha"]))
    elem = ref.K * ref.EPS32 * balance * (x.double().abs().nan_to_num(0, 0, 0) + 2)
    if kw["reduction"] == "none":
        tol = elem
    else:
        tol = elem.sum() / (max(x.numel(), 1) if kw["reduction"] == "mean" else 1)
    ref.assert_matches(result["loss"], want, tol, x.dtype, "loss")
    if result["grad"] is not None:
        g_out = result["grad_output"].double()
        (want_grad,) = torch.autograd.grad(want, x64, g_out)
        want_grad = torch.where(finite, want_grad, 0.0)
        scale = g_out.abs() if kw["reduction"] == "none" else abs(float(g_out)) / (
            max(x.numel(), 1) if kw["reduction"] == "mean" else 1)
        gtol = ref.K * ref.EPS32 * balance * (1 + kw["gamma"]) * 4 * scale * (
            1 + x.double().abs().nan_to_num(0, 0, 0)) + 1e-30
        ref.assert_matches(result["grad"], want_grad, gtol, x.dtype, "grad", roundings=2)


@given(data=st.data())
@settings(max_examples=examples(15))
def test_vocab_parallel_shards_match_full_logits(worker, backend, data):
    """The vocab-parallel entry points on emulated shards (uneven, empty, one column),
    combined by the ops layer: every shard's row losses and the gradient columns equal
    F.cross_entropy on the full logits in float64."""
    require_op(backend, "vocab_parallel_cross_entropy")
    spec = data.draw(strat.vocab_shards_spec(backend))
    kw = spec["kwargs"]
    result, error, message = _run(worker, "vocab_parallel_shards", spec)
    assert error is None, f"{error}: {message}"
    for rank, loss in enumerate(result["losses"]):
        assert torch.equal(loss.nan_to_num(1.5, 2.5, 3.5), result["losses"][0].nan_to_num(
            1.5, 2.5, 3.5)), f"shard {rank} has another loss than shard 0"
    want, x64 = ref.cross_entropy(result["x"], result["target"], result["weight"],
                                  ignore_index=kw["ignore_index"], reduction="none",
                                  label_smoothing=kw["label_smoothing"], z_loss=kw["z_loss"],
                                  softcap=kw["softcap"])
    mags = ref.row_magnitudes(result["x"], result["target"], result["weight"],
                              ignore_index=kw["ignore_index"],
                              label_smoothing=kw["label_smoothing"], z_loss=kw["z_loss"],
                              softcap=kw["softcap"])
    result = dict(result, loss=result["losses"][0],
                  grad_output=torch.ones(want.shape, dtype=torch.float32))
    _check_loss(spec, result, want, x64, mags, result["x"].dtype, "none", 1.0,
                loss_dtype=torch.float32)


@pytest.mark.parametrize("backend_name", ("cpu", "torch"))
@given(data=st.data())
@settings(max_examples=examples(6))
def test_vocab_parallel_public_world_of_one(worker, backend_name, data):
    """fo.vocab_parallel_cross_entropy in a process group of one: F.cross_entropy."""
    require_op(backend_name, "vocab_parallel_cross_entropy")
    spec = data.draw(strat.cross_entropy_spec(backend_name))
    kw = spec["kwargs"]
    result, error, message = _run(worker, "vocab_parallel_public", spec)
    shape = spec["input"]["shape"]
    n_classes = shape[1] if len(shape) >= 2 else shape[0]
    if not spec["soft"] and _expected_target_error(spec, n_classes, kw["ignore_index"]):
        assert error == "IndexError", (error, message)
        return
    assert error is None, f"{error}: {message}"
    want, x64 = ref.cross_entropy(result["x"], result["target"], result["weight"],
                                  **{k: v for k, v in kw.items() if k != "backend"})
    mags = ref.row_magnitudes(result["x"], result["target"], result["weight"],
                              ignore_index=kw["ignore_index"],
                              label_smoothing=kw["label_smoothing"], z_loss=kw["z_loss"],
                              softcap=kw["softcap"])
    _check_loss(spec, result, want, x64, mags, result["x"].dtype, kw["reduction"],
                _denominator(result, spec, kw, n_classes))
