"""Params torch's optimizers train beyond the kernels' fp32/bf16/fp16: float64 (fp64 math and
states) and complex (through view_as_real, complex states), stepped by the `torch` backend
that backend=None picks for them; sparse COO gradients for FusedSGD (Adam refuses them, as
torch's does).  Each against torch itself, also under a global clip across fp64 and fp32
params, and through checkpoints in both directions."""

import copy

import pytest
import torch

import fusedopt as fo
from optim_helpers import clone_params, make_grads, set_grads, train

WIDE = [torch.float64, torch.complex64, torch.complex128]
SHAPES = [(5, 7), (13,), (1,), (3, 4, 2)]
PAIRS = {"adam": (fo.optim.FusedAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
         "adamw": (fo.optim.FusedAdamW, torch.optim.AdamW,
                   dict(lr=1e-2, amsgrad=True, maximize=True)),
         "sgd": (fo.optim.FusedSGD, torch.optim.SGD,
                 dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.1))}


def _tol(dtype):
    """fp64 math (fp64, complex128) to a few fp64 ulps; complex64 in fp32."""
    return dict(rtol=1e-12, atol=1e-14) if dtype in (torch.float64, torch.complex128) \
        else dict(rtol=1e-5, atol=1e-6)


def _params(dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(d).requires_grad_()
            for s, d in zip(SHAPES, dtypes)]


def _grads(dtypes, steps, scale=1.0):
    gen = torch.Generator().manual_seed(1)
    return [[(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(d)
             for s, d in zip(SHAPES, dtypes)] for _ in range(steps)]


def _assert_close(ours, ref, **tol):
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m, i=i: f"param {i}: {m}",
                                   **tol)


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("dtype", WIDE, ids=["fp64", "complex64", "complex128"])
def test_wide_params_train_as_torch_trains_them(kind, dtype):
    ours_cls, ref_cls, kwargs = PAIRS[kind]
    ours = _params([dtype] * 4)
    ref = clone_params(ours)
    opt = ours_cls(ours, **kwargs)
    ref_opt = ref_cls(ref, foreach=False, **kwargs)
    grads = _grads([dtype] * 4, steps=5)
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    _assert_close(ours, ref, **_tol(dtype))
    for p, q in zip(ours, ref):
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == dtype
                torch.testing.assert_close(value, ref_opt.state[q][key], **_tol(dtype))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_a_named_compiled_backend_refuses_wide_params_by_name(backend, monkeypatch):
    for dtype in WIDE:
        with pytest.raises(TypeError, match=rf"dtype {dtype}, which fusedopt backend "
                                            rf"'{backend}' cannot step"):
            fo.optim.FusedAdamW(_params([dtype] * 4), backend=backend)
    monkeypatch.setenv("FUSEDOPT_BACKEND", backend)
    with pytest.raises(TypeError, match=rf"backend '{backend}' \(forced by FUSEDOPT_BACKEND\)"):
        fo.optim.FusedSGD(_params([torch.float64] * 4))
    ps = _params([torch.float32] * 4)
    opt = fo.optim.FusedSGD(ps, lr=0.1, backend="torch")  # named torch: fine
    ps[1].data = ps[1].data.double()
    ps[1].grad = torch.zeros(13, dtype=torch.float64)
    opt.step()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_clip_over_fp64_and_fp32_params_equals_clip_grad_norm(kind):
    """One optimizer over fp64 and fp32 params (the torch backend and the cpu kernels), a
    global clip: equal to torch's clip_grad_norm_ over all of them then torch's step.  The
    norm is summed in fp64 (torch's is too once an fp64 norm takes part), and
    last_grad_norm is fp64 like clip_grad_norm_'s result."""
    ours_cls, ref_cls, kwargs = PAIRS[kind]
    dtypes = [torch.float64, torch.float32, torch.float32, torch.float64]
    ours = _params(dtypes)
    ref = clone_params(ours)
    opt = ours_cls(ours, max_grad_norm=0.5, **kwargs)
    ref_opt = ref_cls(ref, foreach=False, **kwargs)
    norms = []
    for grads in _grads(dtypes, steps=4, scale=3.0):
        set_grads(ours, grads)
        set_grads(ref, grads)
        opt.step()
        norms.append(torch.nn.utils.clip_grad_norm_(ref, 0.5))
        ref_opt.step()
        assert opt.last_grad_norm.dtype == norms[-1].dtype == torch.float64
        torch.testing.assert_close(opt.last_grad_norm, norms[-1], rtol=1e-6, atol=0)
    # fp32 params at fp32 rounding; the fp64 ones see the fp32 part of the norm in the clip
    _assert_close([ours[1], ours[2]], [ref[1], ref[2]], rtol=1e-5, atol=1e-6)
    _assert_close([ours[0], ours[3]], [ref[0], ref[3]], rtol=1e-6, atol=1e-9)
    assert all(n > 0.5 for n in norms)  # the clip was active


def test_fp64_params_under_a_loss_scale_equal_grad_scaler():
    """fp64 and fp32 params under LossScaler against torch.amp.GradScaler's unscale_ + step,
    with an overflow step skipped by both."""
    dtypes = [torch.float64, torch.float32, torch.float64, torch.float32]
    ours = _params(dtypes)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    scaler = fo.amp.LossScaler(init_scale=2.0 ** 10, growth_interval=2)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    for k, grads in enumerate(_grads(dtypes, steps=5)):
        if k == 2:
            grads[0][1, 1] = float("inf")
        for ps, s in ((ours, scaler), (ref, ref_scaler)):
            s.scale(torch.zeros(()))  # creates the scale
            set_grads(ps, [g * s.get_scale() for g in grads])
        scaler.step(opt)
        scaler.update()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
    _assert_close([ours[1], ours[3]], [ref[1], ref[3]], rtol=1e-5, atol=1e-6)
    _assert_close([ours[0], ours[2]], [ref[0], ref[2]], **_tol(torch.float64))


@pytest.mark.parametrize("dtype", WIDE, ids=["fp64", "complex64", "complex128"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_wide_checkpoints_round_trip_with_torch(kind, dtype):
    """torch trains 3 steps, ours resumes from its checkpoint (states keep their dtype), and
    ours' checkpoint resumes in torch; both equal torch's uninterrupted run."""
    ours_cls, ref_cls, kwargs = PAIRS[kind]
    grads = _grads([dtype] * 4, steps=9)
    ref = _params([dtype] * 4)
    ref_opt = ref_cls(ref, **kwargs)
    train(ref_opt, ref, grads[:3])
    ours = clone_params(ref)
    opt = ours_cls(ours, **kwargs)
    opt.load_state_dict(ref_opt.state_dict())
    assert all(v.dtype == dtype for p in ours for k, v in opt.state[p].items() if k != "step")
    train(opt, ours, grads[3:6])
    train(ref_opt, ref, grads[3:6])
    _assert_close(ours, ref, **_tol(dtype))
    back = clone_params(ours)
    back_opt = ref_cls(back, **kwargs)
    back_opt.load_state_dict(opt.state_dict())
    train(back_opt, back, grads[6:])
    train(ref_opt, ref, grads[6:])
    _assert_close(back, ref, **_tol(dtype))


def _embeddings(n=2, seed=0):
    torch.manual_seed(seed)
    first = torch.nn.Embedding(20, 3, sparse=True)
    rest = [torch.nn.Embedding(20, 3, sparse=True) for _ in range(n - 1)]
    for e in rest:
        e.load_state_dict(first.state_dict())
    return [first] + rest


def _lookups(steps=5):
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, 20, (7,), generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("backend", [None, "cpu", "triton", "torch"])
@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.2),
                                    dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)],
                         ids=["plain", "momentum", "nesterov"])
def test_sparse_gradients_train_as_torch_sgd(backend, kwargs):
    """nn.Embedding(sparse=True): FusedSGD steps the sparse gradients (made dense for the
    kernels) as torch's SGD does, on every backend; the .grad stays sparse.  (torch's SGD
    cannot add weight decay to a sparse gradient; FusedSGD can, tested with the clip.)"""
    if backend not in fo.backends.usable("sgd", "cpu") and backend is not None:
        pytest.skip(f"backend {backend!r} cannot run sgd on CPU tensors here")
    ours, ref = _embeddings()
    opt = fo.optim.FusedSGD(ours.parameters(), backend=backend, **kwargs)
    ref_opt = torch.optim.SGD(ref.parameters(), **kwargs)
    for idx in _lookups():
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            (model(idx) ** 2).sum().backward()
            o.step()
        assert ours.weight.grad.layout == torch.sparse_coo
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)


def test_sparse_gradients_with_a_clip_and_torch_checkpoints():
    """A clip over sparse gradients (torch's clip_grad_norm_ cannot take them: the reference
    clips the same gradients made dense), and torch's checkpoint with its sparse momentum
    buffer loads; ours loads into torch and goes on with sparse gradients."""
    ours, ref, dense = _embeddings(3)
    opt = fo.optim.FusedSGD(ours.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.5)
    ref_opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    sparse_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    lookups = _lookups(6)
    for idx in lookups[:3]:
        for model, o in ((ours, opt), (dense, ref_opt)):
            o.zero_grad()
            (model(idx) ** 2).sum().backward()
        dense.weight.grad = dense.weight.grad.to_dense()
        opt.step()
        torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5)
        ref_opt.step()
    torch.testing.assert_close(ours.weight, dense.weight, rtol=1e-5, atol=1e-6)
    sparse_opt.zero_grad()
    (ref(lookups[0]) ** 2).sum().backward()
    sparse_opt.step()
    saved = sparse_opt.state_dict()
    assert saved["state"][0]["momentum_buffer"].layout == torch.sparse_coo
    resumed, again = _embeddings(2, seed=5)
    for model in (resumed, again):
        model.load_state_dict(ref.state_dict())
    loaded = fo.optim.FusedSGD(resumed.parameters(), lr=0.1, momentum=0.9)
    loaded.load_state_dict(copy.deepcopy(saved))  # torch's loader keeps the given tensors
    assert loaded.state[resumed.weight]["momentum_buffer"].layout == torch.strided
    back = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    back.load_state_dict(copy.deepcopy(loaded.state_dict()))
    for idx in lookups[3:]:
        for model, o in ((ref, sparse_opt), (resumed, loaded), (again, back)):
            o.zero_grad()
            (model(idx) ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(resumed.weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.weight, ref.weight, rtol=1e-5, atol=1e-6)


def test_sparse_gradient_with_an_index_outside_its_shape_is_refused():
    p = torch.zeros(4, 3, requires_grad=True)
    opt = fo.optim.FusedSGD([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 3), (4, 3),
                                     check_invariants=False)
    with pytest.raises(ValueError, match=r"indices outside its shape \(4, 3\)"):
        opt.step()
    assert torch.equal(p, torch.zeros(4, 3)) and len(opt.state) == 0


@pytest.mark.parametrize("cls", [fo.optim.FusedAdam, fo.optim.FusedAdamW])
def test_adam_refuses_sparse_gradients_as_torch_does(cls):
    (emb,) = _embeddings(1)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=rf"{cls.__name__} does not support torch.sparse_coo "
                                        rf"gradients"):
        opt.step()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        torch.optim.Adam(emb.parameters()).step()
