"""FusedSGD: multi-tensor SGD (momentum, dampening, Nesterov) with in-kernel unscale,
clipping and skip; one step equals ``torch.optim.SGD`` to fp32 rounding.

The "momentum buffer holds a value" flags (``initialized``) are device tensors kept in
``self._fo_initialized``, outside the visible state: torch's SGD state has only
``momentum_buffer``, shown once the buffer was set by a step that was not skipped.
"""

from __future__ import annotations

import torch

from fusedopt.optim import _checks
from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim.adam import _hyper

_F32 = torch.float32


class FusedSGD(FusedOptimizer):
    """SGD (``torch.optim.SGD``), fused; see SPEC §2."""

    _OP = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, backend=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self._check_hyper_params(defaults)
        self._fo_initialized: dict[torch.Tensor, torch.Tensor] = {}
        super().__init__(params, defaults, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=False, backend=backend)

    def _check_hyper_params(self, group):
        _checks.lr(group["lr"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.real("dampening", group["dampening"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.nesterov(group["nesterov"], group["momentum"], group["dampening"])
        _checks.flag("maximize", group["maximize"])

    def _fo_visible(self, p, entry):
        flag = self._fo_initialized.get(p)
        return "momentum_buffer" in entry and flag is not None and bool(flag > 0)

    def _fo_import(self, p, entry):
        if "momentum_buffer" in entry:
            self._fo_initialized[p] = torch.ones((), dtype=_F32, device=p.device)
        return entry

    def _fo_reset(self, state):
        flags = getattr(self, "_fo_initialized", {})
        self._fo_initialized = {p: f for p, f in flags.items()
                                if "momentum_buffer" in state.get(p, {})}
        super()._fo_reset(state)

    def _layout(self, group):
        return group["momentum"] != 0

    def _state_lists(self, group, params):
        with_buffer = group["momentum"] != 0
        buffers, flags = [], []
        for p in params:
            st = self._fo_state[p]
            flag = self._fo_initialized.get(p)
            if flag is None:
                flag = self._fo_initialized[p] = torch.zeros((), dtype=_F32, device=p.device)
            if with_buffer:
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, dtype=_F32)
                    flag.zero_()
                buffers.append(st["momentum_buffer"])
            flags.append(flag)
        return {"params": params, "momentum_buffers": buffers if with_buffer else None,
                "initialized": flags}

    def _run_bucket(self, bucket, inv_scale, clip_coef, skip):
        lists, group = bucket.lists, bucket.lists["group"]
        device = bucket.params[0].device
        bucket.backend.sgd_step(
            lists["params"], lists["grads"], lists["momentum_buffers"], None, lists["initialized"],
            lr=_hyper(group["lr"], device), momentum=float(group["momentum"]),
            dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]),
            inv_scale=inv_scale, clip_coef=clip_coef, skip=skip, cache=bucket.cache)
