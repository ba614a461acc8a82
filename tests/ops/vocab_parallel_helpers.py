"""Shared helpers of the vocab-parallel kernel tests (test_vocab_parallel_shards.py,
test_vocab_parallel_kernels.py): the emulated shards (tests/vocab_parallel_emulation.py),
the float64 reference on the full logits (F.cross_entropy plus the z-loss written out) and
the inputs."""

import torch
import torch.nn.functional as F

from loss_helpers import IGNORE
from vocab_parallel_emulation import emulate  # noqa: F401  (re-exported)


def reference(x, y, w, *, label_smoothing=0.0, z_loss=0.0, softcap=None, ignore_index=IGNORE):
    """Per-row loss and d(sum of row losses)/dx in float64 (F.cross_entropy + c·lse²)."""
    x64 = x.detach().double().requires_grad_()
    xc = softcap * torch.tanh(x64 / softcap) if softcap is not None else x64
    target = y.double() if y.is_floating_point() else y.long()
    loss = F.cross_entropy(xc, target, None if w is None else w.double(),
                           ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = (torch.ones_like(loss, dtype=torch.bool) if y.is_floating_point()
             else target != ignore_index)
    loss = loss + torch.where(valid, z_loss * torch.logsumexp(xc, dim=1) ** 2, 0.0)
    (grad,) = torch.autograd.grad(loss.sum(), x64)
    return loss.detach(), grad


def inputs(device, n_rows=7, n_classes=13, dtype=torch.float32, seed=0, soft=False,
           spread=3.0):
    """(logits, target, weight): every fourth class target ignored, weights in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    x = (spread * torch.randn(n_rows, n_classes, generator=gen)).to(dtype)
    if soft:
        y = torch.softmax(torch.randn(n_rows, n_classes, generator=gen), dim=1).to(dtype)
    else:
        y = torch.randint(0, n_classes, (n_rows,), generator=gen)
        y[::4] = IGNORE
    w = torch.rand(n_classes, generator=gen) + 0.5
    return x.to(device), y.to(device), w.to(device)
