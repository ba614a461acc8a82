"""FusedSGD: multi-tensor SGD (momentum, dampening, Nesterov) with in-kernel unscale,
clipping and skip; one step equals ``torch.optim.SGD`` to fp32 rounding.

The "momentum buffer holds a value" flags (``initialized``) are device tensors kept in
``self._fo_sgd_flags`` (param -> (buffer, flag)), outside the visible state: torch's SGD
state has only ``momentum_buffer``, shown once the buffer was set by a step that was not
skipped.
"""

from __future__ import annotations

from functools import partial

import torch

from fusedopt.optim import _checks
from fusedopt.optim._base import FusedOptimizer, _hyper, _number
from fusedopt.optim._plan import vector_state

_F32 = torch.float32


class FusedSGD(FusedOptimizer):
    """SGD (``torch.optim.SGD``), fused; see docs/optimizers.md."""

    _OP = "sgd"
    _STATE_KEYS = ("momentum_buffer",)
    _STEP_KEY = False

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, backend=None, process_group=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self._check_hyper_params(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=False, backend=backend, process_group=process_group)

    def _check_hyper_params(self, group):
        _checks.lr(group["lr"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.real("dampening", group["dampening"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.nesterov(group["nesterov"], group["momentum"], group["dampening"])
        _checks.flag("maximize", group["maximize"])

    def _fo_visible(self, p, entry):
        record = self._fo_sgd_flags.get(p)
        return record is not None and bool(record[1] > 0)

    def _layout(self, group):
        return group["momentum"] != 0

    def _state_lists(self, b, pending):
        """Momentum buffers and their "holds a value" flags.  A buffer the optimizer created
        starts unset (torch's first step ``buf = d_p``); any other buffer found in the state
        (loaded, or written by the user) is used as it is, as torch does."""
        buffers = None
        flags = [torch.zeros((), dtype=_F32, device=p.device) for p in b.keys]
        if b.group["momentum"] != 0:
            buffers = vector_state(self, b, "momentum_buffer", pending,
                                   partial(torch.zeros_like, dtype=_F32))
            created = {id(value) for p, key, value in pending.writes}
            for i, (p, buf) in enumerate(zip(b.keys, buffers)):
                record = self._fo_sgd_flags.get(p)
                if record is not None and record[0] is buf:
                    flags[i] = record[1]
                    continue
                if id(buf) not in created:
                    flags[i].fill_(1.0)
                pending.extras.append(partial(self._fo_sgd_flags.__setitem__, p, (buf, flags[i])))
        b.lists = {"momentum_buffers": buffers, "initialized": flags}
        b.state_lists = (("momentum_buffer", buffers),) if buffers is not None else ()

    def _boundary_lists(self, b):
        return ((("momentum_buffers", b.lists["momentum_buffers"]), ("master_params", None)),
                (("initialized", b.lists["initialized"]),))

    def _hyper_args(self, b):
        group = b.group
        return dict(lr=_hyper(group["lr"], b.device, "lr"),
                    momentum=_number(group["momentum"], "momentum"),
                    dampening=_number(group["dampening"], "dampening"),
                    weight_decay=_number(group["weight_decay"], "weight_decay"),
                    nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))

    def _run_bucket(self, b, hyper, inv_scale, clip_coef, skip):
        b.backend.sgd_step(
            b.params, b.grads, b.lists["momentum_buffers"], None, b.lists["initialized"], **hyper,
            inv_scale=inv_scale, clip_coef=clip_coef, skip=skip, cache=b.cache)
