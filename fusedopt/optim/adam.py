"""FusedAdam / FusedAdamW: multi-tensor Adam with in-kernel unscale, clipping and skip.

One step equals ``torch.optim.Adam`` (L2 weight decay added to the gradient) or
``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr·wd``, the group's
``decoupled_weight_decay``) to fp32 rounding; the math is in the backends' ``adam_step``
(docs/architecture.md).
"""

from __future__ import annotations

import torch

from fusedopt.optim import _checks, _traced
from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim._checks import group_number as _number
from fusedopt.optim._scalars import hyper
from fusedopt.optim._plan import (LOW_PRECISION, STATE_KEY, master_copy, state_zeros,
                                  step_state, vector_state)


class FusedAdam(FusedOptimizer):
    """Adam with L2 weight decay (``torch.optim.Adam``), fused; see docs/optimizers.md."""

    _OP = "adam"
    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
    _STEP_KEY = True
    # what torch's Adam sets in a loaded group that lacks the key (its __setstate__)
    _LOAD_DEFAULTS = {"decoupled_weight_decay": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 max_grad_norm=None, track_grad_norm=False, skip_nonfinite=False,
                 master_weights=False, backend=None, process_group=None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay)
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
        _checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        _checks.torch_keywords(group, type(self).__name__)

    def _fo_visible(self, p, entry):
        step = entry.get("step")
        if isinstance(step, torch.Tensor):
            return step.numel() == 1 and bool(step.reshape(()) > 0)
        return step is not None

    def _layout(self, group):
        return bool(group["amsgrad"]), self.master_weights

    def _state_lists(self, b, pending):
        masters = self.master_weights and b.dtype in LOW_PRECISION
        b.lists = {
            "exp_avgs": vector_state(self, b, "exp_avg", pending, state_zeros),
            "exp_avg_sqs": vector_state(self, b, "exp_avg_sq", pending, state_zeros),
            "max_exp_avg_sqs": (vector_state(self, b, "max_exp_avg_sq", pending, state_zeros)
                                if b.group["amsgrad"] else None),
            "master_params": (vector_state(self, b, "master_param", pending, master_copy)
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
        return dict(lr=hyper(group["lr"], device, "lr"), beta1=hyper(beta1, device, "betas[0]"),
                    beta2=hyper(beta2, device, "betas[1]"), eps=_number(group, "eps"),
                    weight_decay=_number(group, "weight_decay"), amsgrad=bool(group["amsgrad"]),
                    maximize=bool(group["maximize"]),
                    decoupled=bool(group["decoupled_weight_decay"]))

    def _run_bucket(self, b, hyper, inv_scale, clip_coef, skip):
        lists = b.lists
        b.backend.adam_step(
            b.params, b.grads, lists["exp_avgs"], lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"], lists["master_params"], lists["steps"], **hyper,
            inv_scale=inv_scale, clip_coef=clip_coef, skip=skip, cache=b.cache)

    def _traced_lists(self, b):
        masters = self.master_weights and b.dtype in LOW_PRECISION
        amsgrad = b.group["amsgrad"]
        lists = b.lists = {"exp_avgs": [], "exp_avg_sqs": [], "max_exp_avg_sqs": [],
                           "master_params": [], "steps": []}
        for p, where in zip(b.params, b.wheres):
            state = _traced.entry(self, p, where)
            lists["exp_avgs"].append(_traced.vector(state, "exp_avg", p, where, state_zeros))
            lists["exp_avg_sqs"].append(
                _traced.vector(state, "exp_avg_sq", p, where, state_zeros))
            if amsgrad:
                lists["max_exp_avg_sqs"].append(
                    _traced.vector(state, "max_exp_avg_sq", p, where, state_zeros))
            if masters:
                lists["master_params"].append(
                    _traced.vector(state, "master_param", p, where, master_copy))
            lists["steps"].append(_traced.step_count(state, p, where))
        if not amsgrad:
            lists["max_exp_avg_sqs"] = None
        if not masters:
            lists["master_params"] = None

    def _traced_hyper(self, b):
        group = b.group
        beta1, beta2 = group["betas"]
        return (*_traced.scalar(group["lr"], "lr"), *_traced.scalar(beta1, "betas[0]"),
                *_traced.scalar(beta2, "betas[1]"), _number(group, "eps"),
                _number(group, "weight_decay"), bool(group["amsgrad"]), bool(group["maximize"]),
                bool(group["decoupled_weight_decay"]))

    def _traced_run(self, b, hyper, inv_scale, clip_coef, skip):
        lists = b.lists
        torch.ops.fusedopt.adam_step(
            b.params, b.grads, lists["exp_avgs"], lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"] or [], lists["master_params"] or [], lists["steps"], *hyper,
            inv_scale, clip_coef, skip, b.backend, self._fo_store_id, b.gi, b.token)


class FusedAdamW(FusedAdam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``), fused; see docs/optimizers.md.

    As torch's AdamW, it is FusedAdam with ``decoupled_weight_decay=True``, which every
    loaded or unpickled param group gets back."""

    _LOAD_DEFAULTS = {}
    _FORCED = {"decoupled_weight_decay": True}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, backend=None, process_group=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, backend=backend,
                         process_group=process_group)
