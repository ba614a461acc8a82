"""FusedAdam / FusedAdamW: multi-tensor Adam with in-kernel unscale, clipping and skip.

One step equals ``torch.optim.Adam`` (L2 weight decay added to the gradient) or
``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr·wd``) to fp32 rounding; the math is in
the backends' ``adam_step`` (docs/architecture.md).
"""

from __future__ import annotations

import torch

from fusedopt.optim import _checks
from fusedopt.optim._base import FusedOptimizer, _on

_F32 = torch.float32


class FusedAdam(FusedOptimizer):
    """Adam with L2 weight decay (``torch.optim.Adam``), fused; see SPEC §2."""

    _OP = "adam"
    _DECOUPLED = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 amsgrad=False, maximize=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, capturable=False, backend=None):
        _checks.flag("capturable", capturable)
        self.capturable = capturable  # accepted for torch parity: step() never syncs anyway
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        self._check_hyper_params(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, backend=backend)

    def _check_hyper_params(self, group):
        _checks.lr(group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("amsgrad", group["amsgrad"])
        _checks.flag("maximize", group["maximize"])

    def _fo_visible(self, p, entry):
        step = entry.get("step")
        return step is not None and bool(step > 0)

    def _layout(self, group):
        return bool(group["amsgrad"])

    def _state_lists(self, group, params):
        amsgrad = bool(group["amsgrad"])
        exp_avgs, exp_avg_sqs, max_sqs, masters, steps = [], [], [], [], []
        for p in params:
            st = self._fo_state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=_F32, device=p.device)
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                if key not in st:
                    st[key] = torch.zeros_like(p, dtype=_F32)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            if amsgrad:
                max_sqs.append(st["max_exp_avg_sq"])
            steps.append(st["step"])
            master = self._master_for(p, st)
            if master is not None:
                masters.append(master)
        return {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                "max_exp_avg_sqs": max_sqs if amsgrad else None,
                "master_params": masters if masters else None, "steps": steps}

    def _run_bucket(self, bucket, inv_scale, clip_coef, skip):
        lists, group = bucket.lists, bucket.lists["group"]
        device = bucket.params[0].device
        beta1, beta2 = group["betas"]
        bucket.backend.adam_step(
            lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"], lists["master_params"], lists["steps"],
            lr=_hyper(group["lr"], device), beta1=_hyper(beta1, device),
            beta2=_hyper(beta2, device), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]), decoupled=self._DECOUPLED,
            inv_scale=inv_scale, clip_coef=clip_coef, skip=skip, cache=bucket.cache)


class FusedAdamW(FusedAdam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``), fused; see SPEC §2."""

    _DECOUPLED = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 amsgrad=False, maximize=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, capturable=False, backend=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad=amsgrad, maximize=maximize,
                         max_grad_norm=max_grad_norm, track_grad_norm=track_grad_norm,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                         capturable=capturable, backend=backend)


def _hyper(value, device):
    """lr / beta as the backend takes it: a Python float or an fp32 0-dim tensor on device."""
    return _on(value, device) if torch.is_tensor(value) else float(value)
