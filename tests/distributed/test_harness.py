"""The multi-process test harness itself: results in rank order, a failing rank's traceback,
a hang turned into a timeout, and a fresh start after either."""

import pytest

from _harness import RankFailure, RankPool, RankTimeout, backend_skip_reason


def sum_of_ranks(rank, world, offset):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return (rank, world, t.item() + offset)


def fails_on_last_rank(rank, world):
    if rank == world - 1:
        raise ValueError(f"deliberate failure on rank {rank}")
    return rank


def hangs_on_rank_zero(rank, world):
    import torch.distributed as dist

    if rank != 0:
        dist.barrier()  # waits for rank 0, which never comes
    else:
        import time

        time.sleep(60)


def test_failures_and_hangs_are_reported_and_recovered():
    reason = backend_skip_reason("gloo", 2)
    if reason is not None:
        pytest.skip(reason)
    with RankPool(2, "gloo") as pool:
        assert pool.run(sum_of_ranks, 10.0) == [(0, 2, 11.0), (1, 2, 11.0)]
        with pytest.raises(RankFailure, match="deliberate failure on rank 1"):
            pool.run(fails_on_last_rank)
        with pytest.raises(RankTimeout, match=r"rank\(s\) \[0, 1\]: no answer within 2 s"):
            pool.run(hangs_on_rank_zero, timeout=2)
        assert pool.run(sum_of_ranks, 0.0) == [(0, 2, 1.0), (1, 2, 1.0)]
