"""What fusedopt is measured against: torch eager, torch.compile, torch.optim, torch's
chunked F.linear_cross_entropy, the GEMM floor, Liger, apex.

Every builder returns a zero-argument callable that runs one forward+backward of a loss or
one optimizer step, or raises `Skip` with the reason it cannot run here (a library not
installed, a device it does not support, torch.compile failing on this machine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Skip(Exception):
    """A candidate that cannot run here; the message says why."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ----------------------------------------------------------------------------- losses
# Each eager loss is what a PyTorch user writes with torch ops, reduction "mean".

def cross_entropy_eager(label_smoothing: float):
    def loss(logits, target):
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    return loss


def focal_eager(gamma: float):
    """Softmax focal loss, one-hot targets: mean of -(1 - p_y)^gamma * log p_y."""
    def loss(logits, target):
        log_p_target = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        p_target = log_p_target.exp()
        return (-(1 - p_target) ** gamma * log_p_target).mean()
    return loss


def sigmoid_focal_eager(alpha: float, gamma: float):
    """RetinaNet's sigmoid focal loss (torchvision's formula), reduction "mean"."""
    def loss(logits, target):
        prob = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        prob_true = prob * target + (1 - prob) * (1 - target)
        weighted = bce * (1 - prob_true) ** gamma
        alpha_t = alpha * target + (1 - alpha) * (1 - target)
        return (alpha_t * weighted).mean()
    return loss


def loss_step(loss_fn, logits: torch.Tensor, target: torch.Tensor):
    """One forward + backward of ``loss_fn`` w.r.t. the logits (the gradient is returned by
    autograd.grad and dropped, so nothing accumulates between calls)."""
    def run():
        loss = loss_fn(logits, target)
        return torch.autograd.grad(loss, logits)[0]
    return run


def compiled_loss_step(loss_fn, logits, target):
    """`loss_step` of ``torch.compile(loss_fn)``; compiles now (untimed), or raises Skip."""
    if not hasattr(torch, "compile"):
        raise Skip(f"torch {torch.__version__} has no torch.compile")
    from torch import _dynamo

    _dynamo.reset()  # fresh caches: no recompile limit reached across cases
    run = loss_step(torch.compile(loss_fn, dynamic=False), logits, target)
    try:
        run()
    except Exception as exc:  # no C++ compiler, unsupported device, ...
        raise Skip(f"torch.compile failed on this machine: {first_line(exc)}") from None
    return run


def liger_cross_entropy_step(logits, target, label_smoothing: float):
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        raise Skip("Liger-Kernel is not installed (pip install liger-kernel)") from None
    if logits.device.type != "cuda":
        raise Skip("Liger-Kernel runs on CUDA tensors only")
    run = loss_step(LigerCrossEntropyLoss(label_smoothing=label_smoothing), logits, target)
    try:
        run()
    except Exception as exc:
        raise Skip(f"Liger-Kernel failed: {first_line(exc)}") from None
    return run


def apex_cross_entropy_step(logits, target, label_smoothing: float):
    try:
        from apex.contrib.xentropy import SoftmaxCrossEntropyLoss
    except ImportError:
        raise Skip("apex (with contrib xentropy) is not installed") from None
    if logits.device.type != "cuda":
        raise Skip("apex xentropy runs on CUDA tensors only")

    def loss(x, t):
        return SoftmaxCrossEntropyLoss.apply(x, t, label_smoothing, -100, False).mean()

    run = loss_step(loss, logits, target)
    try:
        run()
    except Exception as exc:
        raise Skip(f"apex xentropy failed: {first_line(exc)}") from None
    return run


# ----------------------------------------------------------------------------- linear CE
# Forward + backward of the LM head and its loss: gradients of the input and the weight.

def _linear_ce_step(loss_fn, x, weight, target):
    def run():
        return torch.autograd.grad(loss_fn(x, weight, target), (x, weight))
    return run


def linear_ce_eager_step(x, weight, target):
    """F.linear + F.cross_entropy: the N x V logits, their softmax and gradient in memory."""
    return _linear_ce_step(lambda a, w, t: F.cross_entropy(F.linear(a, w), t), x, weight, target)


def linear_ce_torch_chunked_step(x, weight, target):
    """torch's chunked F.linear_cross_entropy (options=LinearCrossEntropyOptions())."""
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_cls is None or not hasattr(F, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
    return _linear_ce_step(lambda a, w, t: F.linear_cross_entropy(a, w, t,
                                                                   options=options_cls()),
                           x, weight, target)


def linear_ce_gemm_floor(x, weight, target):
    """The three GEMMs of the op alone, full size (logits = x W^T, dX = G W, dW = G^T x with
    G the logits standing in for their gradient): the time any implementation needs."""
    x, weight = x.detach(), weight.detach()

    def run():
        logits = x @ weight.t()
        return logits @ weight, logits.t() @ x
    return run


def liger_linear_ce_step(x, weight, target):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise Skip("Liger-Kernel is not installed (pip install liger-kernel)") from None
    if x.device.type != "cuda":
        raise Skip("Liger-Kernel runs on CUDA tensors only")
    liger = LigerFusedLinearCrossEntropyLoss()
    run = _linear_ce_step(lambda a, w, t: liger(w, a, t), x, weight, target)
    try:
        run()
    except Exception as exc:
        raise Skip(f"Liger-Kernel failed: {first_line(exc)}") from None
    return run


# ----------------------------------------------------------------------------- optimizers
# Same hyper-parameters for every implementation (fusedopt's defaults equal torch's).

OPTIMIZER_KWARGS = {
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "sgd": {"lr": 1e-3, "momentum": 0.9},
}
# The AMP pipelines run with scale 1 and no growth: the torch pipeline unscales the shared
# gradients in place, so any other scale would change their values from call to call.
SCALER_KWARGS = {"init_scale": 1.0, "growth_interval": 2**30}
MAX_GRAD_NORM = 1.0

_TORCH_CLASSES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def torch_optimizer(kind: str, params, impl: str) -> torch.optim.Optimizer:
    """torch.optim.<kind> with ``impl`` in ("foreach", "fused"); Skip if unsupported here."""
    cls = getattr(torch.optim, _TORCH_CLASSES[kind])
    try:
        opt = cls(params, **OPTIMIZER_KWARGS[kind], **{impl: True})
        opt.step()
    except (RuntimeError, TypeError, ValueError) as exc:
        raise Skip(f"torch.optim.{cls.__name__}({impl}=True) cannot run here: "
                   f"{first_line(exc)}") from None
    return opt


def torch_optimizer_step(kind: str, params, impl: str):
    return torch_optimizer(kind, params, impl).step


def torch_amp_clip_step(params, impl: str):
    """The torch pipeline: GradScaler.unscale_ + clip_grad_norm_ + AdamW(<impl>) + update."""
    device = params[0].device
    opt = torch_optimizer("adamw", params, impl)
    try:
        scaler = torch.amp.GradScaler(device.type, **SCALER_KWARGS)
        scaler.scale(torch.ones((), device=device))  # creates the scale tensor
    except (RuntimeError, TypeError, ValueError) as exc:
        raise Skip(f"torch.amp.GradScaler cannot run on {device.type}: {first_line(exc)}") from None

    def run():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
        scaler.step(opt)
        scaler.update()
    return run


def apex_optimizer_step(kind: str, params):
    try:
        import apex.optimizers as apex_optim
    except ImportError:
        raise Skip("apex (with its fused optimizers) is not installed") from None
    if params[0].device.type != "cuda":
        raise Skip("apex optimizers run on CUDA tensors only")
    try:
        if kind == "sgd":
            opt = apex_optim.FusedSGD(params, **OPTIMIZER_KWARGS[kind])
        else:
            opt = apex_optim.FusedAdam(params, adam_w_mode=(kind == "adamw"),
                                       **OPTIMIZER_KWARGS[kind])
        opt.step()
    except Exception as exc:
        raise Skip(f"apex {kind} failed: {first_line(exc)}") from None
    return opt.step
