"""torch.compile(fullgraph=True) traces through the loss custom ops (no graph break) and
gives the same losses and gradients as eager.  Kept to a few small tests: compiling is slow."""

import torch
import torch.nn.functional as F

import fusedopt as fo
from loss_helpers import assert_close, random_grad_output

IGNORE = -100


class Head(torch.nn.Module):
    """A linear classifier scored by all three losses."""

    def __init__(self, n_in=6, n_classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(n_in, n_classes)
        self.register_buffer("class_weight", torch.linspace(0.5, 1.5, n_classes))

    def forward(self, x, y, t):
        z = self.proj(x)
        ce = fo.cross_entropy(z, y, self.class_weight, label_smoothing=0.1, z_loss=1e-3,
                              softcap=5.0)
        focal = fo.focal_loss(z, y, gamma=2.0, alpha=0.5)
        sigmoid = fo.sigmoid_focal_loss(z, t, reduction="mean")
        return ce + focal + sigmoid


def _inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    y[3] = IGNORE
    return x, y, torch.rand(8, 5, generator=gen)


def _loss_and_grads(fn, module, *inputs, grad_output=None):
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss, list(module.parameters()), grad_output)
    return loss.detach(), grads


def test_compiled_losses_match_eager_inductor():
    torch._dynamo.reset()
    model = Head()
    inputs = _inputs()
    want, want_grads = _loss_and_grads(model, model, *inputs)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):  # the second call reuses the compiled graphs
        got, got_grads = _loss_and_grads(compiled, model, *inputs)
        assert_close(got, want, what="loss")
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, what="grad")


def test_compiled_none_reduction_and_inplace_backward():
    """reduction='none' with a random grad_output, and inplace_backward, under the
    aot_eager backend (same tracing and fake implementations, no C++ compile)."""
    torch._dynamo.reset()
    model = Head()
    x, y, _ = _inputs()

    def per_row(x, y):
        z = model.proj(x) * 1.0
        return fo.cross_entropy(z, y, reduction="none", inplace_backward=True) + \
            fo.focal_loss(model.proj(x), y, reduction="none")

    want = per_row(x, y)
    g_out = random_grad_output(want)
    want, want_grads = _loss_and_grads(per_row, model, x, y, grad_output=g_out)
    compiled = torch.compile(per_row, fullgraph=True, backend="aot_eager")
    got, got_grads = _loss_and_grads(compiled, model, x, y, grad_output=g_out)
    assert_close(got, want, what="loss")
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, what="grad")


def test_compiled_float64_losses():
    """float64 logits (the torch backend in float64) compile without a graph break and
    equal eager to float64 rounding."""
    torch._dynamo.reset()
    model = Head().double()
    x, y, t = _inputs()
    inputs = (x.double(), y, t.double())
    want, want_grads = _loss_and_grads(model, model, *inputs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, got_grads = _loss_and_grads(compiled, model, *inputs)
    assert got.dtype == torch.float64
    assert_close(got, want, rtol=1e-12, atol=1e-14, what="loss")
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, rtol=1e-12, atol=1e-14, what="grad")


def test_compiled_second_backward_through_retained_graph():
    """A compiled loss traces the plain backward; a retained graph still gives the right
    gradient twice (the compiled backward never scales the saved gradient in place)."""
    torch._dynamo.reset()
    model = Head()
    x, y, _ = _inputs()
    compiled = torch.compile(lambda x: fo.cross_entropy(model.proj(x), y, reduction="none"),
                             fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    g_out = random_grad_output(loss)
    want = _loss_and_grads(lambda x: F.cross_entropy(model.proj(x), y, reduction="none"),
                           model, x, grad_output=g_out)[1]
    for _ in range(2):
        got = torch.autograd.grad(loss, list(model.parameters()), g_out, retain_graph=True)
        for g, w in zip(got, want):
            assert_close(g, w, what="grad")
