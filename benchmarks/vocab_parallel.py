"""Vocab-parallel cross-entropy, forward + backward, on several ranks of one machine:
fusedopt.vocab_parallel_cross_entropy (every backend that has the kernels) against torch's
loss_parallel() F.cross_entropy and against gathering the logits for fusedopt.cross_entropy.
Interleaved rounds, medians, printed by rank 0.

    python benchmarks/vocab_parallel.py [--ranks 2] [--rows 1024] [--classes 32000]
        [--dtype float32] [--rounds 7] [--device cpu|cuda]

CPU runs use gloo with one thread per rank; --device cuda uses NCCL, one GPU per rank.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _candidates(local, target, rank, world, mesh):
    import fusedopt as fo
    from fusedopt import backends
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    def ours(backend):
        def run():
            logits = local.clone().requires_grad_()
            fo.vocab_parallel_cross_entropy(logits, target, backend=backend).backward()
        return run

    def torch_loss_parallel():
        logits = local.clone().requires_grad_()
        dlogits = DTensor.from_local(logits, mesh, [Shard(1)], run_check=False)
        with loss_parallel():
            F.cross_entropy(dlogits, target).backward()

    def gather_then_fused():
        logits = local.clone().requires_grad_()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, logits.detach())
        full = torch.cat(parts, dim=1).requires_grad_()
        fo.cross_entropy(full, target).backward()
        logits.backward(full.grad.chunk(world, dim=1)[rank])

    found = {f"fusedopt vocab-parallel [{b}]": ours(b)
             for b in backends.usable("vocab_parallel_cross_entropy", local.device)}
    found["torch loss_parallel F.cross_entropy"] = torch_loss_parallel
    found["all-gather + fusedopt.cross_entropy"] = gather_then_fused
    return found


def _rank(rank, args, port):
    from torch.distributed.device_mesh import init_device_mesh

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.ranks)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (args.ranks,))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.classes, generator=gen).to(getattr(torch, args.dtype))
    target = torch.randint(0, args.classes, (args.rows,), generator=gen).to(device)
    local = logits.chunk(args.ranks, dim=1)[rank].contiguous().to(device)
    runs = _candidates(local, target, rank, args.ranks, mesh)
    times = {name: [] for name in runs}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, run in runs.items():
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        print(f"{args.ranks} ranks, logits {args.rows} x {args.classes} {args.dtype} split over "
              f"the classes, forward + backward, median of {args.rounds} (ms):")
        for name, ts in times.items():
            print(f"  {name:40s} {1e3 * statistics.median(ts[1:]):9.1f}")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    mp.spawn(_rank, args=(args, port), nprocs=args.ranks)


if __name__ == "__main__":
    main()
