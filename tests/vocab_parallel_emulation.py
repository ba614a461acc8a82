"""A backend's two vocab-parallel entry points on emulated shards, with the ops layer's
combination of the ranks done in one process (shared by the vocab-parallel kernel tests in
tests/ops and the fuzz suite)."""

import torch

from fusedopt.ops import vocab_parallel


def emulate(impl, x, y, w, bounds, *, label_smoothing=0.0, z_loss=0.0, softcap=None,
            soft=False, ignore_index=-100, inplace=False, **kernel_options):
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
