"""torch.compile(opt.step, fullgraph=True): the step traces without a graph break (the
kernels are torch.library custom ops) and equals the eager step bit for bit, step after
step, with clipping, a loss scale that overflows once, tensor hyper-parameters changed in
place, masters, fp64 params, memory-lean states; it compiles twice (the first call creates the state) and not
again.  Compiling is slow: one Inductor test, the variants under the "eager" and
"aot_eager" compile backends (the same tracing; aot_eager also runs the fake
implementations and functionalization), the ops themselves through torch.library.opcheck."""

import pytest
import torch

import fusedopt as fo
from conftest import require_op
from fusedopt.optim import _ops
from optim_helpers import assert_bit_identical, make_grads, make_params, set_grads, snapshot

SHAPES = [(5, 7), (13,), (1,), (3, 4, 2)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _graphs_and_breaks():
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _twins(make_opt, device, dtypes=None):
    """Two identical (params, optimizer) pairs: one stepped eagerly, one compiled."""
    out = []
    for _ in range(2):
        ps = make_params(SHAPES, device=device)
        if dtypes is not None:
            ps = [p.detach().to(d).requires_grad_() for p, d in zip(ps, dtypes)]
        out.append((ps, make_opt(ps)))
    return out


def _assert_same(eager, compiled, what):
    (ps, opt), (qs, copt) = eager, compiled
    try:
        assert_bit_identical(snapshot(opt, ps), snapshot(copt, qs))
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None
    for name in ("last_grad_norm", "skipped_steps"):
        a, b = getattr(opt, name), getattr(copt, name)
        assert (a is None) == (b is None), f"{what}: {name}"
        if a is not None:
            assert_bit_identical([a], [b])


def test_inductor_step_with_clip_scale_and_tensor_lr_equals_eager():
    """AdamW with clipping, a tensor lr decayed in place, and a LossScaler's scale handed
    over as LossScaler.step does (an overflow skips step 3): Inductor's compiled step equals
    the eager one bit for bit, and compiles twice."""
    lrs = [torch.tensor(1e-2), torch.tensor(1e-2)]
    twins = _twins(lambda ps: fo.optim.FusedAdamW(ps, lr=lrs.pop(0), weight_decay=0.1,
                                                  max_grad_norm=0.5, backend="cpu"), "cpu")
    (ps, opt), (qs, copt) = twins
    scale = torch.tensor(2.0 ** 8)
    compiled = torch.compile(lambda: copt._fo_step_with_loss_scale(scale)[0], fullgraph=True)
    for k, grads in enumerate(make_grads(SHAPES, steps=5, scale=2.0 ** 8)):
        if k == 2:
            grads[1][4] = float("inf")
        set_grads(ps, grads)
        set_grads(qs, grads)
        found = opt._fo_step_with_loss_scale(scale)[0]
        assert torch.equal(compiled(), found)
        _assert_same(twins[0], twins[1], f"step {k}")
        for o in (opt, copt):
            o.param_groups[0]["lr"].mul_(0.7)
    assert float(copt.skipped_steps) == 1.0
    assert _graphs_and_breaks() == (2, 0)


ADAM = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True, maximize=True,
            max_grad_norm=1.0, master_weights=True)
VARIANTS = {
    "adamw-bf16-masters-amsgrad": (lambda ps, b: fo.optim.FusedAdamW(ps, backend=b, **ADAM),
                                   "adam", [torch.bfloat16, torch.float32] * 2),
    "adam-l2-fp16": (lambda ps, b: fo.optim.FusedAdam(ps, lr=1e-2, weight_decay=0.1,
                                                      skip_nonfinite=True, backend=b),
                     "adam", [torch.float16] * 4),
    "adamw-bf16-states-clip": (lambda ps, b: fo.optim.FusedAdamW(
        ps, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, skip_nonfinite=True,
        state_dtype=torch.bfloat16, seed=3, backend=b), "lean_adam", None),
    "adamw-8bit-states-bf16-params-stochastic": (lambda ps, b: fo.optim.FusedAdamW(
        ps, lr=1e-2, state_dtype=torch.int8, param_rounding="stochastic", skip_nonfinite=True,
        seed=4, backend=b), "lean_adam", [torch.bfloat16] * 4),
    "sgd-nesterov-clip": (lambda ps, b: fo.optim.FusedSGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, max_grad_norm=1.0,
        backend=b), "sgd", None),
    "sgd-masters-no-momentum": (lambda ps, b: fo.optim.FusedSGD(
        ps, lr=0.05, master_weights=True, skip_nonfinite=True, backend=b), "sgd",
        [torch.bfloat16] * 4),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_variants_equal_eager(backend, variant):
    """Each backend's kernels under the traced step (Dynamo's "eager" compile backend), a
    non-finite gradient at step 2 skipping the steps that check for it."""
    make, op, dtypes = VARIANTS[variant]
    device = require_op(backend, op)
    twins = _twins(lambda ps: make(ps, backend), device, dtypes)
    (ps, opt), (qs, copt) = twins
    compiled = torch.compile(copt.step, backend="eager", fullgraph=True)
    for k, grads in enumerate(make_grads(SHAPES, steps=4)):
        if k == 2:
            grads[3][0, 0, 1] = float("nan")
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        compiled()
        _assert_same(twins[0], twins[1], f"step {k}")
    assert _graphs_and_breaks() == (2, 0)
    assert opt.state_dict()["state"].keys() == copt.state_dict()["state"].keys()


def test_aot_eager_float64_with_fp32_grad_scaler_and_state_created_eagerly():
    """fp64 params (the torch backend) next to fp32 ones (cpu) with a global clip, under
    torch.amp.GradScaler's grad_scale / found_inf, traced through functionalization and the
    fake implementations; the first step runs eagerly, so the compiled step compiles once."""
    dtypes = [torch.float64, torch.float32, torch.float64, torch.float32]
    twins = _twins(lambda ps: fo.optim.FusedAdamW(ps, lr=1e-2, max_grad_norm=0.5), "cpu",
                   dtypes)
    (ps, opt), (qs, copt) = twins
    compiled = torch.compile(copt.step, backend="aot_eager", fullgraph=True)
    for k, grads in enumerate(make_grads(SHAPES, steps=4, scale=4.0)):
        set_grads(ps, grads)
        set_grads(qs, grads)
        for o in (opt, copt):
            o.grad_scale = torch.tensor(4.0)
            o.found_inf = torch.tensor(1.0 if k == 2 else 0.0)
        opt.step()
        (copt.step if k == 0 else compiled)()
        _assert_same(twins[0], twins[1], f"step {k}")
    assert opt.last_grad_norm.dtype == torch.float64
    assert _graphs_and_breaks() == (1, 0)


def test_loss_scaler_step_and_update_compile_with_complex_params():
    """``scaler.step(opt); scaler.update()`` as one fullgraph function, over complex64
    params (the torch backend, through their real views) beside fp32 ones (cpu), an
    overflow at step 2: equals the same code run eagerly, scale and norms included."""
    require_op("cpu", "adam")
    dtypes = [torch.complex64, torch.float32] * 2
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, dtype=d, generator=gen).requires_grad_()
              for s, d in zip(SHAPES, dtypes)]
        runs.append((ps, fo.optim.FusedAdamW(ps, lr=1e-2, max_grad_norm=0.5),
                     fo.amp.LossScaler(init_scale=2.0 ** 8, growth_interval=2)))

    def update(opt, scaler):
        scaler.step(opt)
        scaler.update()

    steps = [update, torch.compile(update, backend="aot_eager", fullgraph=True)]
    scales = []
    for k in range(4):
        x = [torch.randn(s, generator=torch.Generator().manual_seed(k)) for s in SHAPES]
        for (ps, opt, scaler), run in zip(runs, steps):
            loss = sum((torch.view_as_real(p)[..., 0] if p.is_complex() else p).mul(xi)
                       .sin().sum() for p, xi in zip(ps, x))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if k == 2:
                ps[1].grad[4] = float("inf")
            run(opt, scaler)
        (ps, opt, scaler), (qs, copt, cscaler) = runs
        _assert_same((ps, opt), (qs, copt), f"step {k}")
        assert torch.equal(cscaler._scale, scaler._scale), f"step {k}: scale"
        scales.append(cscaler.get_scale())
    assert scales == [2.0 ** 8, 2.0 ** 9, 2.0 ** 8, 2.0 ** 8]  # grown after 2, backed off
    assert float(copt.skipped_steps) == 1.0
    assert _graphs_and_breaks()[1] == 0


def test_compiled_training_step_breaks_only_where_torch_does():
    """A whole AMP training step under torch.compile (no fullgraph) trains like eager, and
    its only graph breaks are torch's own (``loss.backward()``, ``Optimizer.zero_grad``):
    none in the loss, the optimizer step or the scaler."""
    require_op("cpu", "adam")
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                  torch.nn.Linear(16, 5)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    runs = []
    for model in models:
        opt = fo.optim.FusedAdamW(model.parameters(), lr=torch.tensor(1e-3),
                                  max_grad_norm=1.0, backend="cpu")
        scaler = fo.amp.LossScaler(init_scale=2.0 ** 12)

        def train_step(x, y, model=model, opt=opt, scaler=scaler):
            loss = fo.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss.detach()
        runs.append(train_step)
    runs[1] = torch.compile(runs[1], backend="eager")
    gen = torch.Generator().manual_seed(1)
    for k in range(3):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        losses = [run(x, y) for run in runs]
        assert torch.equal(losses[1], losses[0]), f"step {k}: loss"
        assert_bit_identical(list(models[0].parameters()), list(models[1].parameters()))
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("backward" in why or "Optimizer.zero_grad" in why for why in breaks)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_compiled_and_eager_steps_interleave(kind):
    """State created by a compiled step is what the eager step goes on with, and the
    reverse (the eager plan notices entries the traced step created)."""
    def make(ps):
        if kind == "sgd":
            return fo.optim.FusedSGD(ps, lr=0.05, momentum=0.9, max_grad_norm=1.0,
                                     backend="cpu")
        return fo.optim.FusedAdamW(ps, lr=1e-2, amsgrad=True, max_grad_norm=1.0, backend="cpu")
    twins = _twins(make, "cpu")
    (ps, opt), (qs, copt) = twins
    compiled = torch.compile(copt.step, backend="eager", fullgraph=True)
    for k, grads in enumerate(make_grads(SHAPES, steps=6)):
        grads = list(grads)
        if k == 0:
            grads[2] = None  # param 2 gets its state at the second compiled step
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        (copt.step if k in (2, 3) else compiled)()
        _assert_same(twins[0], twins[1], f"step {k}")
    assert len(copt.state) == len(SHAPES)


def test_tensor_lr_scheduler_does_not_recompile():
    """A tensor lr, which torch's schedulers change in place, is read by the kernel: the
    compiled step does not recompile when it changes (a float lr is a constant of the graph,
    as in torch's own compiled optimizers)."""
    ps = make_params(SHAPES)
    opt = fo.optim.FusedSGD(ps, lr=torch.tensor(0.1), momentum=0.9, backend="cpu")
    compiled = torch.compile(opt.step, backend="eager", fullgraph=True)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for grads in make_grads(SHAPES, steps=5):
        set_grads(ps, grads)
        compiled()
        scheduler.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 * 0.5 ** 5, rel=1e-6)
    assert _graphs_and_breaks() == (2, 0)


def test_bad_state_fails_the_compilation_with_the_eager_message_and_changes_nothing():
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, backend="cpu")
    set_grads(ps, make_grads(SHAPES, steps=1)[0])
    opt.step()
    opt.state[ps[1]]["exp_avg"] = torch.zeros(13, dtype=torch.float16)
    before = snapshot(opt, ps)
    with pytest.raises(Exception, match=r"\['exp_avg'\] has dtype torch.float16, expected "
                                        r"torch.float32"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert_bit_identical(before, snapshot(opt, ps))


def test_an_optimizer_on_torch_distributed_is_refused_at_trace_time():
    """The norm's all-reduce is not traced: a process group (here a stand-in, as set by
    ``process_group=``) fails the compilation, before anything ran."""
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, max_grad_norm=1.0, backend="torch")
    set_grads(ps, make_grads(SHAPES, steps=1)[0])
    opt.process_group = object()
    before = snapshot(opt, ps)
    with pytest.raises(Exception, match="on torch.distributed .* is not supported"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert_bit_identical(before, snapshot(opt, ps))


def test_aot_eager_lean_states_with_masters_and_a_loss_scale():
    """8-bit moments of fp16 params with fp32 masters and bf16 moments of fp32 params in
    two groups, under a LossScaler's scale that overflows once, traced through
    functionalization and the fake implementations of fusedopt::lean_adam_step."""
    require_op("cpu", "lean_adam")

    def make(ps):
        return fo.optim.FusedAdamW(
            [{"params": ps[:2]}, {"params": ps[2:], "state_dtype": torch.bfloat16}], lr=1e-2,
            state_dtype=torch.int8, master_weights=True, max_grad_norm=0.5, seed=8,
            backend="cpu")

    twins = _twins(make, "cpu", [torch.float16, torch.float16, torch.float32, torch.float32])
    (ps, opt), (qs, copt) = twins
    scale = torch.tensor(2.0 ** 6)
    compiled = torch.compile(lambda: copt._fo_step_with_loss_scale(scale)[0],
                             backend="aot_eager", fullgraph=True)
    for k, grads in enumerate(make_grads(SHAPES, steps=4, scale=2.0 ** 6)):
        if k == 1:
            grads[0][0, 0] = float("inf")
        set_grads(ps, grads)
        set_grads(qs, grads)
        found = opt._fo_step_with_loss_scale(scale)[0]
        assert torch.equal(compiled(), found)
        _assert_same(twins[0], twins[1], f"step {k}")
    assert float(copt.skipped_steps) == 1.0
    assert copt.state[qs[0]]["exp_avg"].dtype == torch.int8
    assert copt.state[qs[3]]["exp_avg_sq"].dtype == torch.bfloat16
    assert _graphs_and_breaks() == (2, 0)


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_custom_ops_pass_opcheck(backend_name):
    """Schemas (mutated lists declared), fake implementations and AOT dispatch of the ops."""
    if backend_name == "cpu":
        require_op("cpu", "adam")
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen) for s in SHAPES]

    def like(value=None):
        return [torch.randn(p.shape, generator=gen).abs() if value is None
                else torch.full(p.shape, value) for p in ps]

    flags = [torch.zeros(()) for _ in ps]
    store, keep = _ops.new_store()
    scalars = (torch.tensor(0.5), torch.tensor(0.8), torch.tensor(0.0))
    after = torch.zeros(())
    torch.library.opcheck(torch.ops.fusedopt.verify_step.default, (
        ps + like() + like() + like() + flags, [0, len(ps), 3, 1, 1, 1, 0, 1], store,
        torch.device("cpu")))
    torch.library.opcheck(torch.ops.fusedopt.multi_tensor_norm.default,
                          (like(), scalars[0], backend_name, store, after))
    torch.library.opcheck(torch.ops.fusedopt.adam_step.default, (
        ps, like(), like(0.0), like(), like(), [], list(flags), 1e-2, None, 0.9,
        torch.tensor(0.9), 0.999, None, 1e-8, 0.1, True, False, True, *scalars,
        backend_name, store, 0, after))
    torch.library.opcheck(torch.ops.fusedopt.sgd_step.default, (
        ps, like(), like(0.0), [], list(flags), 0.0, torch.tensor(0.1), 0.9, 0.0, 0.1,
        False, True, *scalars, backend_name, store, 1, None))
    codes = [torch.zeros(p.shape, dtype=torch.int8) for p in ps]
    sq_codes = [torch.zeros(p.shape, dtype=torch.uint8) for p in ps]
    blocks = [torch.zeros(-(-p.numel() // 256)) for p in ps]
    for moments in ((codes, sq_codes, blocks, [b.clone() for b in blocks]),
                    ([p.bfloat16() for p in like()], [p.bfloat16() for p in like()], [], [])):
        torch.library.opcheck(torch.ops.fusedopt.lean_adam_step.default, (
            ps, like(), *moments, [], [torch.zeros(()) for _ in ps], list(range(len(ps))),
            1e-2, None, 0.9, torch.tensor(0.9), 0.999, None, 1e-8, 0.1, False, True, False, 7,
            *scalars, backend_name, store, 2, after))


def test_verify_step_refuses_a_spec_that_does_not_describe_its_tensors():
    tensors = [torch.zeros(3) for _ in range(4)]
    store, keep = _ops.new_store()
    for spec in ([0, 2, 0, 0, 1], [0, 1, 1, 0, 1], [0, -1, 0, 0], [0, 1, 5, 0], [0, 1, 0],
                 [0, 1, 0, 0, 0, 2, 0, 0], [0, 1, 1, 0, 9], [0, 1, 0, 1, 2]):
        with pytest.raises(ValueError, match="does not describe the 4 tensors"):
            torch.ops.fusedopt.verify_step(tensors, spec, store, torch.device("cpu"))
    torch.ops.fusedopt.verify_step(tensors, [0, 1, 0, 0, 0, 1, 0, 0], store,
                                   torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_cuda_graphs_training_step(backend_name):
    """mode="reduce-overhead": the optimizer's graph runs as a CUDA graph (params, states
    and counters are static inputs, updated in place: no cudagraph skip), and a whole
    training step with LossScaler trains like eager."""
    require_op(backend_name, "adam")
    ps = make_params(SHAPES, device="cuda")
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = fo.optim.FusedAdamW(ps, lr=torch.tensor(1e-2, device="cuda"), max_grad_norm=1.0,
                              backend=backend_name)
    copt = fo.optim.FusedAdamW(qs, lr=torch.tensor(1e-2, device="cuda"), max_grad_norm=1.0,
                               backend=backend_name)
    compiled = torch.compile(copt.step, mode="reduce-overhead", fullgraph=True)
    for grads in make_grads(SHAPES, steps=6):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        compiled()
    torch.cuda.synchronize()
    assert_bit_identical(snapshot(opt, ps), snapshot(copt, qs))
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
                                  torch.nn.Linear(32, 5)).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    runs = []
    for model in models:
        o = fo.optim.FusedAdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"),
                                max_grad_norm=1.0, backend=backend_name)
        scaler = fo.amp.LossScaler(init_scale=2.0 ** 12)

        def train_step(x, y, model=model, o=o, scaler=scaler):
            loss = fo.cross_entropy(model(x), y)
            o.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
            return loss.detach()
        runs.append(train_step)
    runs[1] = torch.compile(runs[1], mode="reduce-overhead")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(6):
        x = torch.randn(16, 8, device="cuda", generator=gen)
        y = torch.randint(0, 5, (16,), device="cuda", generator=gen)
        losses = [run(x, y).clone() for run in runs]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

