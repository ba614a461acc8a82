"""FusedAdam / FusedAdamW: multi-tensor Adam with in-kernel unscale, clipping and skip.

One step equals ``torch.optim.Adam`` (L2 weight decay added to the gradient) or
``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr·wd``) to fp32 rounding; the math is in
the backends' ``adam_step`` (docs/architecture.md).
"""

from __future__ import annotations

from functools import partial

import torch

from fusedopt.optim import _checks
from fusedopt.optim._base import FusedOptimizer, _hyper, _number
from fusedopt.optim._plan import STATE_KEY, step_state, vector_state

_F32 = torch.float32


class FusedAdam(FusedOptimizer):
    """Adam with L2 weight decay (``torch.optim.Adam``), fused; see docs/optimizers.md."""

    _OP = "adam"
    _DECOUPLED = False
    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
    _STEP_KEY = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 amsgrad=False, maximize=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, capturable=False, backend=None,
                 process_group=None):
        _checks.flag("capturable", capturable)
        self.capturable = capturable  # accepted for torch parity: step() never syncs anyway
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        self._check_hyper_params(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, backend=backend,
                         process_group=process_group)

    def _check_hyper_params(self, group):
        _checks.lr(group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("amsgrad", group["amsgrad"])
        _checks.flag("maximize", group["maximize"])

    def _fo_visible(self, p, entry):
        step = entry.get("step")
        if isinstance(step, torch.Tensor):
            return step.numel() == 1 and bool(step.reshape(()) > 0)
        return step is not None

    def _layout(self, group):
        return bool(group["amsgrad"]), self.master_weights

    def _state_lists(self, b, pending):
        zeros = partial(torch.zeros_like, dtype=_F32)
        masters = self.master_weights and b.dtype != _F32
        b.lists = {
            "exp_avgs": vector_state(self, b, "exp_avg", pending, zeros),
            "exp_avg_sqs": vector_state(self, b, "exp_avg_sq", pending, zeros),
            "max_exp_avg_sqs": (vector_state(self, b, "max_exp_avg_sq", pending, zeros)
                                if b.group["amsgrad"] else None),
            "master_params": (vector_state(self, b, "master_param", pending, _master_copy)
                              if masters else None),
            "steps": step_state(self, b, pending),
        }
        b.state_lists = tuple((STATE_KEY[name], lst) for name, lst in b.lists.items()
                              if lst is not None)

    def _boundary_lists(self, b):
        lists = b.lists
        return ((("exp_avgs", lists["exp_avgs"]), ("exp_avg_sqs", lists["exp_avg_sqs"]),
                 ("max_exp_avg_sqs", lists["max_exp_avg_sqs"]),
                 ("master_params", lists["master_params"])), (("steps", lists["steps"]),))

    def _hyper_args(self, b):
        group, device = b.group, b.device
        beta1, beta2 = group["betas"]
        return dict(lr=_hyper(group["lr"], device, "lr"), beta1=_hyper(beta1, device, "betas[0]"),
                    beta2=_hyper(beta2, device, "betas[1]"), eps=_number(group["eps"], "eps"),
                    weight_decay=_number(group["weight_decay"], "weight_decay"),
                    amsgrad=bool(group["amsgrad"]),
                    maximize=bool(group["maximize"]), decoupled=self._DECOUPLED)

    def _run_bucket(self, b, hyper, inv_scale, clip_coef, skip):
        lists = b.lists
        b.backend.adam_step(
            b.params, b.grads, lists["exp_avgs"], lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"], lists["master_params"], lists["steps"], **hyper,
            inv_scale=inv_scale, clip_coef=clip_coef, skip=skip, cache=b.cache)


class FusedAdamW(FusedAdam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``), fused; see docs/optimizers.md."""

    _DECOUPLED = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 amsgrad=False, maximize=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, capturable=False, backend=None,
                 process_group=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad=amsgrad, maximize=maximize,
                         max_grad_norm=max_grad_norm, track_grad_norm=track_grad_norm,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                         capturable=capturable, backend=backend, process_group=process_group)


def _master_copy(p):
    """The fp32 master of a low-precision param, made from it (its layout kept)."""
    return p.detach().to(_F32, copy=True)
