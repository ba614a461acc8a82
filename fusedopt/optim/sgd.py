"""FusedSGD: multi-tensor SGD (momentum, dampening, Nesterov) with in-kernel unscale,
clipping and skip; one step equals ``torch.optim.SGD`` to fp32 rounding.

The "momentum buffer holds a value" flags (``initialized``) are device tensors kept in
``self._fo_sgd_flags`` (param -> (buffer, flag)), outside the visible state: torch's SGD
state has only ``momentum_buffer``, shown once the buffer was set by a step that was not
skipped.  With ``master_weights=True`` and no momentum the record is (master, flag), the
flag set after the first step that was not skipped.
"""

from __future__ import annotations

from functools import partial

import torch

from fusedopt.optim import _checks, _traced
from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim._checks import group_flag as _flag
from fusedopt.optim._checks import group_number as _number
from fusedopt.optim._scalars import hyper
from fusedopt.optim._plan import LOW_PRECISION, master_copy, state_zeros, vector_state

_F32 = torch.float32


class FusedSGD(FusedOptimizer):
    """SGD (``torch.optim.SGD``), fused; see docs/optimizers.md."""

    _OP = "sgd"
    _STATE_KEYS = ("momentum_buffer", "master_param")
    _STEP_KEY = False
    _SPARSE_GRADS = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, capturable=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, backend=None, process_group=None):
        _checks.flag("capturable", capturable)  # torch's SGD has none; accepted, no effect
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused)
        self._check_hyper_params(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, backend=backend,
                         process_group=process_group)

    def _check_hyper_params(self, group):
        _checks.lr(group["lr"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.real("dampening", group["dampening"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.nesterov(group["nesterov"], group["momentum"], group["dampening"])
        _checks.flag("maximize", group["maximize"])
        _checks.torch_keywords(group, type(self).__name__)

    def _fo_visible(self, p, entry):
        record = self._fo_sgd_flags.get(p)
        return record is not None and bool(record[1] > 0)

    def _layout(self, group):
        return _number(group, "momentum") != 0

    def _state_lists(self, b, pending):
        """Momentum buffers, masters and the "holds a value" flags.  A buffer the optimizer
        created starts unset (torch's first step ``buf = d_p``); any other buffer found in
        the state (loaded, or written by the user) is used as it is, as torch does.  Without
        momentum the flag of a master the optimizer created tells whether a step completed
        for it (``confirm``: set after each step that was not skipped)."""
        masters = None
        if self.master_weights and b.dtype in LOW_PRECISION:
            masters = vector_state(self, b, "master_param", pending, master_copy)
        buffers = None
        if _number(b.group, "momentum") != 0:
            buffers = vector_state(self, b, "momentum_buffer", pending, state_zeros)
        flags = [torch.zeros((), dtype=_F32, device=p.device) for p in b.keys]
        tracked = buffers if buffers is not None else masters
        if tracked is not None:
            created = {id(value) for p, key, value in pending.writes}
            for i, (p, value) in enumerate(zip(b.keys, tracked)):
                record = self._fo_sgd_flags.get(p)
                if record is not None and record[0] is value:
                    flags[i] = record[1]
                    continue
                if id(value) not in created:
                    flags[i].fill_(1.0)
                _traced.mark_static((flags[i],))
                pending.extras.append(partial(self._fo_sgd_flags.__setitem__, p,
                                              (value, flags[i])))
        b.lists = {"momentum_buffers": buffers, "master_params": masters, "initialized": flags,
                   "confirm": flags if buffers is None and masters is not None else None}
        b.state_lists = tuple((key, lst) for key, lst in (("momentum_buffer", buffers),
                                                         ("master_param", masters))
                              if lst is not None)

    def _boundary_lists(self, b):
        return ((("momentum_buffers", b.lists["momentum_buffers"]),
                 ("master_params", b.lists["master_params"])),
                (("initialized", b.lists["initialized"]),))

    def _hyper_args(self, b):
        group = b.group
        return dict(lr=hyper(group["lr"], b.device, "lr"), momentum=_number(group, "momentum"),
                    dampening=_number(group, "dampening"),
                    weight_decay=_number(group, "weight_decay"),
                    nesterov=_flag(group, "nesterov"), maximize=_flag(group, "maximize"))

    def _run_bucket(self, b, hyper, inv_scale, clip_coef, skip):
        lists = b.lists
        b.backend.sgd_step(
            b.params, b.grads, lists["momentum_buffers"], lists["master_params"],
            lists["initialized"], **hyper, inv_scale=inv_scale, clip_coef=clip_coef, skip=skip,
            cache=b.cache)
        if lists["confirm"] is not None:
            confirm_steps(lists["confirm"], skip)

    def _traced_lists(self, b):
        """As `_state_lists`, read from optimizer.state by the traced step."""
        momentum = _number(b.group, "momentum") != 0
        masters = self.master_weights and b.dtype in LOW_PRECISION
        lists = b.lists = {"momentum_buffers": [], "master_params": [], "initialized": []}
        for p, where in zip(b.params, b.wheres):
            if not (momentum or masters):  # no state; the kernels ignore the flag
                lists["initialized"].append(torch.zeros((), dtype=_F32, device=p.device))
                continue
            state = _traced.entry(self, p, where)
            new = state.get("momentum_buffer" if momentum else "master_param") is None
            if masters:
                lists["master_params"].append(
                    _traced.vector(state, "master_param", p, where, master_copy))
            if momentum:
                lists["momentum_buffers"].append(
                    _traced.vector(state, "momentum_buffer", p, where, state_zeros))
            tracked = lists["momentum_buffers" if momentum else "master_params"][-1]
            record = self._fo_sgd_flags.get(p)
            if record is not None and record[0] is tracked:
                flag = record[1]
            else:
                flag = torch.full((), 0.0 if new else 1.0, dtype=_F32, device=p.device)
                _traced.mark_static((flag,))
                self._fo_sgd_flags[p] = (tracked, flag)
            lists["initialized"].append(flag)
        lists["confirm"] = lists["initialized"] if masters and not momentum else None
        if not momentum:
            lists["momentum_buffers"] = None
        if not masters:
            lists["master_params"] = None

    def _traced_hyper(self, b):
        group = b.group
        return (*_traced.scalar(group["lr"], "lr"), _number(group, "momentum"),
                _number(group, "dampening"), _number(group, "weight_decay"),
                _flag(group, "nesterov"), _flag(group, "maximize"))

    def _traced_run(self, b, hyper, inv_scale, clip_coef, skip):
        lists = b.lists
        torch.ops.fusedopt.sgd_step(
            b.params, b.grads, lists["momentum_buffers"] or [], lists["master_params"] or [],
            lists["initialized"], *hyper, inv_scale, clip_coef, skip, b.backend,
            self._fo_store_id, b.gi, b.token)
        if lists["confirm"] is not None:  # after the op: the token orders it after the checks
            confirm_steps(lists["confirm"], skip if skip is not None else b.token)


def confirm_steps(flags, skip):
    """Set the flags to 1 unless the step was skipped (they are never reset to 0)."""
    done = torch.ones((), dtype=_F32, device=flags[0].device) if skip is None else \
        (skip <= 0).to(_F32)
    torch._foreach_maximum_(flags, [done] * len(flags))
