"""Cross-entropy and focal loss at large logit spreads and on wide rows (50257 classes: odd,
so rows are not 16-byte aligned; 131072 classes: 256 KB bf16 / 512 KB fp32 rows, over the
cuda kernels' 64 KB row cache), on every backend that runs here, against float64 PyTorch.

The fp32 tolerances are those of what a GPU computes.  Compiled Triton evaluates `tl.exp(v)`
as `ex2.approx(v * log2 e)` and fp32 `/` as an approximate division, and contracts a*b + c
into FMAs; the CUDA kernels use the hardware exp as well.  None of that happens under the
interpreter or on the CPU, so the bound has to come from the instructions:
  * every exponent argument is v = x_j - max <= 0; ex2.approx has a relative error below
    2^-22, and rounding v * log2 e adds |v| * 2^-24, so p_j = exp(v - log_sum) is off by at
    most p_j * (2^-21 + |v| 2^-24): terms with a large |v| are tiny (p_j < e^v), and the
    absolute error of any p_j stays below ~5e-7 (|v| * e^v <= 1/e);
  * log-sum-exp is off by the relative error of its sum (<= 2^-21) plus the rounding of
    max + log_sum, i.e. an ulp of the largest logit: relative to the loss (lse - x_y,
    which is at least the spread when x_y is not the max) well below 1e-5;
  * the approximate division (2 ulp) and FMA contraction add a few fp32 ulps.
Hence rtol 1e-5 and atol 1e-6 on the loss and on the gradient (entries in [-1, 1]), for
spreads up to 300 and rows with +-1e4 outliers.  bf16 follows flash-attention's rule."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import assert_close, assert_lowp_rule, grads_of

pytestmark = pytest.mark.gpu_check  # the compiled kernels' precision: in the quick GPU check

N = 4
SPREADS = ["randn*30", "randn*300", "outliers_1e4"]


def make_logits(spread, c, device, dtype=torch.float32, seed=0):
    """N rows of c logits; `outliers_1e4`: randn*3 with one +1e4 and one -1e4 per row, the
    target on the +1e4 class in row 0 and elsewhere in the other rows."""
    gen = torch.Generator().manual_seed(seed)
    scale = {"randn*30": 30.0, "randn*300": 300.0, "outliers_1e4": 3.0}[spread]
    x = scale * torch.randn(N, c, generator=gen)
    y = torch.randint(0, c, (N,), generator=gen)
    if spread == "outliers_1e4":
        hot = torch.randint(0, c, (N,), generator=gen)
        x[torch.arange(N), hot] = 1e4
        x[torch.arange(N), (hot + 1) % c] = -1e4
        y[0] = hot[0]
        y[1:] = torch.where(y[1:] == hot[1:], (hot[1:] + 2) % c, y[1:])
    return x.to(dtype).to(device).requires_grad_(), y.to(device)


def reference(fn, x, y, dtype=torch.float64, **kw):
    x_ref = x.detach().to(dtype).requires_grad_()
    loss = fn(x_ref, y, **kw)
    return loss, grads_of(loss, x_ref)


def torch_ce(x, y, label_smoothing):
    return F.cross_entropy(x, y, reduction="none", label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("c", [50257, 131072])
@pytest.mark.parametrize("spread", SPREADS)
def test_cross_entropy_fp32(backend, spread, c, label_smoothing):
    device = require_op(backend, "cross_entropy")
    x, y = make_logits(spread, c, device)
    loss = fo.cross_entropy(x, y, reduction="none", label_smoothing=label_smoothing,
                            backend=backend)
    want, want_grad = reference(torch_ce, x, y, label_smoothing=label_smoothing)
    assert_close(loss, want, what="loss")
    assert_close(grads_of(loss, x), want_grad, what="grad")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_bf16_rows_over_64kb(backend, label_smoothing):
    device = require_op(backend, "cross_entropy")
    x, y = make_logits("randn*30", 131072, device, torch.bfloat16)
    loss = fo.cross_entropy(x, y, reduction="none", label_smoothing=label_smoothing,
                            backend=backend)
    want, want_grad = reference(torch_ce, x, y, label_smoothing=label_smoothing)
    low, low_grad = reference(torch_ce, x, y, torch.bfloat16, label_smoothing=label_smoothing)
    assert_lowp_rule(loss, want, low, torch.bfloat16, what="loss")
    assert_lowp_rule(grads_of(loss, x), want_grad, low_grad, torch.bfloat16, what="grad")


def torch_focal(x, y, gamma):
    """Per-row softmax focal loss, -(1 - p_y)^gamma log p_y, written out."""
    logp = torch.log_softmax(x, dim=1).gather(1, y[:, None])[:, 0]
    return -(-torch.expm1(logp)) ** gamma * logp


@pytest.mark.parametrize("spread", ["randn*300", "outliers_1e4"])
def test_focal_loss_fp32(backend, spread):
    device = require_op(backend, "focal_loss")
    x, y = make_logits(spread, 50257, device)
    loss = fo.focal_loss(x, y, gamma=2.0, reduction="none", backend=backend)
    want, want_grad = reference(torch_focal, x, y, gamma=2.0)
    assert_close(loss, want, what="loss")
    assert_close(grads_of(loss, x), want_grad, what="grad")
