"""The cross-entropy entry points of the `cpu` and `triton` backends, called directly, on the
inputs of issue 11 in every kernel path: soft targets and label smoothing (with and without
class weights) on large logits, with and without a gradient, in place, on rows ending in a
partial vector (cpu) or spanning several chunks (Triton `block_size`). The loss must match
F.cross_entropy in float64 on the same fp32 values at fp32 tolerance: the kernels add up
w_j (max - x_j), never lse sum w - sum w x. The `cuda` kernels: test_cuda_losses.py (gpu)."""

import pytest
import torch
import torch.nn.functional as F

from fusedopt import backends
from cpu_loss_helpers import assert_close

IGNORE = -100
ENTRIES = ["cpu", "triton", "triton-chunks"]


def _entry(name):
    backend = name.split("-")[0]
    ok, reason = backends.status(backend)
    if not ok:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    module = backends._load(backend)
    extra = dict(block_size=16) if name == "triton-chunks" else {}
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")

    def run(x, y, weight, **kw):
        scales = torch.ones(2, dtype=torch.float32, device=device)
        loss, grad = module.cross_entropy_fwd(
            x.to(device), y.to(device), None if weight is None else weight.to(device), scales,
            ignore_index=IGNORE, z_loss=0.0, softcap=None, **kw, **extra)
        return loss.cpu(), None if grad is None else grad.cpu()
    return run


def _reference(x, y, weight, eps, soft):
    """Row losses and d(sum of rows)/dx by F.cross_entropy in float64 on the same values."""
    x64 = x.detach().double().requires_grad_()
    target = y.double() if soft else y
    w = None if weight is None else weight.double()
    loss = F.cross_entropy(x64, target, weight=w, ignore_index=IGNORE, reduction="none",
                           label_smoothing=eps)
    loss.sum().backward()
    return loss.detach(), x64.grad


def _case(kind, n, c, soft, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "equal_1e30":
        x = torch.full((n, c), 1e30)
    else:
        x = 3 * torch.randn(n, c, generator=gen) + 1e6
    if soft:
        y = torch.softmax(torch.randn(n, c, generator=gen), dim=1)
    else:
        y = torch.randint(0, c, (n,), generator=gen)
        y[1] = IGNORE
    weight = torch.rand(c, generator=gen) + 0.5
    return x, y, weight


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("c", [37, 300])
@pytest.mark.parametrize("kind", ["equal_1e30", "offset_1e6"])
@pytest.mark.parametrize("soft", [False, True], ids=["smoothing", "soft"])
def test_large_logits_in_every_path(entry, kind, c, soft):
    run = _entry(entry)
    x, y, weight = _case(kind, 4, c, soft)
    for w in (None, weight):
        eps = 0.1
        ref_loss, ref_grad = _reference(x, y, w, eps, soft)
        loss, grad = run(x, y, w, label_smoothing=eps, soft_target=soft, inplace=False,
                         need_grad=True)
        assert_close(loss, ref_loss, what=f"loss, weights: {w is not None}")
        assert_close(grad, ref_grad, what=f"grad, weights: {w is not None}")
        loss_only, none = run(x, y, w, label_smoothing=eps, soft_target=soft, inplace=False,
                              need_grad=False)
        assert none is None
        assert_close(loss_only, ref_loss, what="loss without a gradient")
        x_inplace = x.clone()
        loss_inplace, grad_inplace = run(x_inplace, y, w, label_smoothing=eps,
                                         soft_target=soft, inplace=True, need_grad=True)
        assert_close(loss_inplace, ref_loss, what="loss, in place")
        assert_close(grad_inplace, ref_grad, what="grad, in place")


# the NaN of 0 * inf is the expected value; the Triton interpreter reports it
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("entry", ENTRIES)
def test_infinite_logits_give_torchs_values(entry):
    """-inf logits: with smoothing each adds +inf to the loss as in torch (w log p = -inf),
    NaN where its weight is 0 (0 * -inf, as torch); a soft target 0 there gives NaN too."""
    run = _entry(entry)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    x[0, 3] = x[1, 7] = x[2, 0] = float("-inf")
    y = torch.tensor([0, 1, 2])
    weight = torch.ones(20)
    weight[7] = 0.0
    for w in (None, weight):
        loss, _ = run(x, y, w, label_smoothing=0.1, soft_target=False, inplace=False,
                      need_grad=True)
        ref_loss, _ = _reference(x, y, w, 0.1, False)
        assert_close(loss, ref_loss, what=f"class targets, weights: {w is not None}")
    q = torch.softmax(torch.randn(3, 20), dim=1)
    q[0, 3] = 0.0
    loss, grad = run(x, q, None, label_smoothing=0.0, soft_target=True, inplace=False,
                     need_grad=True)
    ref_loss, ref_grad = _reference(x, q, None, 0.0, True)
    assert_close(loss, ref_loss, what="soft targets")
    assert_close(grad, ref_grad, what="soft targets, grad")
