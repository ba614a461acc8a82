"""Optimizer state of the fused optimizers: ``optimizer.state``, loading, pickling.

``self._fo_state`` maps each param to a dict with torch's keys (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``master_param``).  It is the
truth: every step reads it again (fusedopt/optim/_plan.py), so whatever the user writes,
replaces or deletes there is what the next step uses.

``optimizer.state`` is a mapping view of it (`StateView`): item access, assignment and
deletion go straight through, and a missing entry is created on access like torch's
``defaultdict(dict)``.  Iteration (and so ``state_dict()``) hides only the entries the
optimizer itself created at a step whose completion is not known yet: state is created on
the device before the device knows whether the step is skipped, so an entry shows once a
step completed for it (``_fo_visible``, which may read the device).  ``self._fo_hidden``
holds those params; ``self._fo_version`` counts additions, replacements and deletions of
whole entries (the step re-reads the per-param dicts when it changed; what is inside them
it reads at every step).
"""

from __future__ import annotations

from collections.abc import MutableMapping
import torch

from fusedopt.optim import _loading, _ops

# caches, and the process group (which does not pickle): an unpickled optimizer takes its
# DTensor params' mesh again, or none
_TRANSIENT = ("_fo_backends", "_fo_plans", "_fo_norm_caches", "_fo_store_id", "_fo_store",
              "_fo_norm", "_fo_group_arg", "process_group")


class StateView(MutableMapping):
    """``optimizer.state``: a live view of the optimizer's internal state dict."""

    __slots__ = ("_opt",)

    def __init__(self, opt):
        self._opt = opt

    def _shown(self):
        opt = self._opt
        hidden, state = opt._fo_hidden, opt._fo_state
        for p in list(hidden):
            entry = state.get(p)
            if entry is None or opt._fo_visible(p, entry):
                hidden.discard(p)
        return [p for p in state if p not in hidden]

    def __getitem__(self, param):
        state = self._opt._fo_state
        entry = state.get(param)
        if entry is None:
            entry = state[param] = {}
            self._opt._fo_version += 1
        return entry

    def __setitem__(self, param, entry):
        self._opt._fo_state[param] = entry
        self._opt._fo_hidden.discard(param)
        self._opt._fo_version += 1

    def __delitem__(self, param):
        del self._opt._fo_state[param]
        self._opt._fo_hidden.discard(param)
        self._opt._fo_version += 1

    def __contains__(self, param):
        opt = self._opt
        entry = opt._fo_state.get(param)
        if entry is None:
            return False
        if param in opt._fo_hidden and opt._fo_visible(param, entry):
            opt._fo_hidden.discard(param)
        return param not in opt._fo_hidden

    def get(self, param, default=None):
        return self._opt._fo_state[param] if param in self else default

    def __iter__(self):
        return iter(self._shown())

    def __len__(self):
        return len(self._shown())

    def __repr__(self):
        return f"{type(self).__name__}({dict(self.items())!r})"


class StateMixin:
    """Mixed into FusedOptimizer before torch.optim.Optimizer."""

    @property
    def state(self):
        return StateView(self)

    @state.setter
    def state(self, value):
        """``optimizer.state = ...`` replaces the whole state (e.g. a reset)."""
        if isinstance(value, StateView):
            value = dict(value._opt._fo_state)
        self._fo_reset(value if isinstance(value, dict) else dict(value))

    def _fo_visible(self, p, entry) -> bool:  # per optimizer
        raise NotImplementedError

    def load_state_dict(self, state_dict):
        """torch's loader, validating every entry first (see ``_loading``); states stay fp32.
        A refused checkpoint changes nothing."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = _loading.load(self, state_dict)
        self.param_groups = groups
        self._fo_reset(state)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _fo_reset(self, state: dict):
        """Install a new internal state; every cached plan and flag is dropped."""
        self._fo_state = state
        self._fo_version = getattr(self, "_fo_version", 0) + 1
        self._fo_hidden = set()
        self._fo_sgd_flags = {}
        self._fo_plans = {}
        self._fo_norm_caches = {}
        self._fo_epoch = getattr(self, "_fo_epoch", 0) + 1

    # ------------------------------------------------------------ pickling / deepcopy

    def __getstate__(self):
        """Everything but the caches and what torch does not pickle either: hooks and a
        ``step`` patched onto the instance (an LR scheduler's)."""
        return {k: v for k, v in self.__dict__.items()
                if k not in _TRANSIENT and k != "step" and not k.startswith("_optimizer_")}

    def __setstate__(self, state):
        state = dict(state)
        internal = state.pop("_fo_state", None)
        hidden = state.pop("_fo_hidden", set())
        flags = state.pop("_fo_sgd_flags", {})
        if internal is None:  # torch's layout: {"defaults", "state", "param_groups"}
            internal = dict(state.pop("state", {}))
        vars_ = state.setdefault("_fo_vars", {})
        vars_.setdefault("last_grad_norm", state.pop("last_grad_norm", None))
        super().__setstate__(state)
        for group in self.param_groups:  # a pickle of an older version lacks newer keys
            for name, default in self.defaults.items():
                group.setdefault(name, self._LOAD_DEFAULTS.get(name, default))
            group.update(self._FORCED)
        self._fo_backends = {}
        self._fo_store_id, self._fo_store = _ops.new_store()
        self._fo_norm = self._fo_group_arg = self.process_group = None
        self._fo_reset(internal)
        self._fo_hidden, self._fo_sgd_flags = set(hidden), dict(flags)
