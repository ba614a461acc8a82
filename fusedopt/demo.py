"""`python -m fusedopt demo`: train a small MLP classifier on synthetic data with fusedopt.

FusedAdamW (max_grad_norm=1.0) + fo.nn.CrossEntropyLoss(label_smoothing=0.1) + LossScaler,
printing the loss curve, the gradient norm the optimizer measured in its kernels, the loss
scale, and the accuracy at the end. bf16 autocast on CUDA; fp32 on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

import fusedopt as fo


def make_data(n: int, dim: int, classes: int, generator: torch.Generator):
    """Gaussian clusters: a learnable problem with a known answer."""
    centers = torch.randn(classes, dim, generator=generator) * 2.0
    labels = torch.randint(0, classes, (n,), generator=generator)
    points = centers[labels] + torch.randn(n, dim, generator=generator)
    return points, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--backend", default=None, help="force a backend (default: best available)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x, y = make_data(args.batch * 16, args.dim, args.classes, gen)
    x, y = x.to(device), y.to(device)

    model = torch.nn.Sequential(
        torch.nn.Linear(args.dim, 256), torch.nn.GELU(),
        torch.nn.Linear(256, 256), torch.nn.GELU(),
        torch.nn.Linear(256, args.classes),
    ).to(device)
    opt = fo.optim.FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01,
                              max_grad_norm=1.0, backend=args.backend)
    loss_fn = fo.nn.CrossEntropyLoss(label_smoothing=0.1, backend=args.backend)
    scaler = fo.amp.LossScaler(init_scale=2.0**12)

    print(f"fusedopt demo on {device}: MLP {args.dim}->256->256->{args.classes}, "
          f"{sum(p.numel() for p in model.parameters()):,} params, batch {args.batch}")
    print(f"{'step':>5} {'loss':>8} {'grad norm':>10} {'scale':>8}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[idx])
        loss = loss_fn(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step == 1 or step % max(1, args.steps // 10) == 0:
            # logging reads device values: the only host syncs of the loop
            print(f"{step:>5} {loss.item():>8.4f} {opt.last_grad_norm.item():>10.4f} "
                  f"{scaler.get_scale():>8.0f}")
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    print(f"trained {args.steps} steps in {elapsed:.1f} s; accuracy on the data {accuracy:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
