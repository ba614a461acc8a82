"""Shared helpers of the vocab-parallel kernel tests (test_vocab_parallel_shards.py,
test_vocab_parallel_kernels.py): a backend's two entry points on emulated shards with the
ops layer's combination of the ranks in one process, and the float64 reference on the full
logits (F.cross_entropy plus the z-loss written out)."""

import torch
import torch.nn.functional as F

from fusedopt.ops import vocab_parallel
from loss_helpers import IGNORE


def emulate(impl, x, y, w, bounds, *, label_smoothing=0.0, z_loss=0.0, softcap=None,
            soft=False, ignore_index=IGNORE, inplace=False, **kernel_options):
    """Row losses (from every shard) and the gradient columns of the shards `bounds`,
    with the two all-reduces of the group replaced by their results (rank order); with
    `inplace` each shard's gradient overwrites its columns of `x`."""
    n_classes = x.shape[1]
    scales = torch.ones(2, dtype=torch.float32, device=x.device)
    shards = [dict(logits=x[:, lo:hi], target=y[:, lo:hi] if soft else y,
                   weight=None if w is None else w[lo:hi],
                   shard=dict(class_offset=lo, num_classes=n_classes,
                              ignore_index=ignore_index, label_smoothing=label_smoothing,
                              softcap=softcap, soft_target=soft))
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    stats = [impl.vocab_parallel_row_stats(s["logits"], s["target"], s["weight"], **s["shard"],
                                           **kernel_options) for s in shards]
    row_max = torch.stack([st[:, 0] for st in stats]).amax(dim=0)
    contributions = []

    def combine(s, st, total):
        def all_reduce(t, op):
            if op == "max":
                t.copy_(row_max)
            elif total is None:
                contributions.append(t.clone())
            else:
                t.copy_(total)

        local_sum_w = (s["weight"].sum() if s["weight"] is not None
                       else float(s["logits"].shape[1]))
        return vocab_parallel._combine(st, y, w, local_sum_w, scales, all_reduce, n_classes,
                                       ignore_index, label_smoothing, z_loss, soft)

    for s, st in zip(shards, stats):
        combine(s, st, None)
    total = sum(contributions[1:], contributions[0])
    losses, grads = [], []
    for s, st in zip(shards, stats):
        row_loss, coefs = combine(s, st, total)
        losses.append(row_loss)
        grads.append(impl.vocab_parallel_grad(s["logits"], s["target"], s["weight"], coefs,
                                              inplace=inplace, **s["shard"], **kernel_options))
    return losses, torch.cat(grads, dim=1)


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
