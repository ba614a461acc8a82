"""Optimizer state of the fused optimizers: the lazy view, loading, pickling.

``self._fo_state`` maps each param to a dict with torch's keys (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``master_param``), all fp32 on
the param's device with the param's layout.  It is created on the device at the first
step in which the param has a gradient, before the device knows whether the step will be
skipped.  So ``optimizer.state`` (and hence ``state_dict()``) shows only the entries that
have completed a step (``_fo_visible``, which may read the device); the others behave as
if they did not exist.
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy

import torch

_F32 = torch.float32
_TRANSIENT = ("_fo_backends", "_fo_buckets", "_fo_norm_caches")


class StateMixin:
    """Mixed into FusedOptimizer before torch.optim.Optimizer."""

    # ------------------------------------------------------------ lazy view

    @property
    def state(self):
        seen = self.__dict__.setdefault("_fo_seen", set())
        view = defaultdict(dict)
        for p, entry in self._fo_state.items():
            if not torch.is_tensor(p):
                view[p] = entry
            elif id(p) in seen or self._fo_visible(p, entry):
                seen.add(id(p))
                view[p] = entry
        return view

    @state.setter
    def state(self, value):
        self._fo_state = defaultdict(dict, value)
        self.__dict__["_fo_seen"] = set()

    def _fo_visible(self, p, entry) -> bool:  # per optimizer
        raise NotImplementedError

    def _fo_import(self, p, entry) -> dict:  # per optimizer: hook after the generic import
        return entry

    # ------------------------------------------------------------ loading

    def load_state_dict(self, state_dict):
        """torch's loader, except that states stay fp32 (torch would cast them to the param dtype)."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"the optimizer has {len(groups)}")
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"loaded state dict's parameter group {i} has {len(sg['params'])} "
                                 f"params, the optimizer's has {len(g['params'])}")
        id_map = {}
        for g, sg in zip(groups, saved_groups):
            id_map.update(zip(sg["params"], g["params"]))

        state = defaultdict(dict)
        for key, entry in state_dict["state"].items():
            p = id_map.get(key)
            state[key if p is None else p] = entry if p is None else self._import_entry(p, entry)
        for g, sg in zip(groups, saved_groups):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
            for name, default in self.defaults.items():
                sg.setdefault(name, default)
        self.param_groups = saved_groups
        self._fo_reset(state)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _import_entry(self, p, entry):
        out = {}
        for key, value in entry.items():
            if value is None:
                continue
            if key == "step":
                out[key] = torch.as_tensor(value).detach().to(device=p.device, dtype=_F32).reshape(()).clone()
            elif torch.is_tensor(value) and value.is_floating_point() and value.shape == p.shape:
                copy = torch.empty_like(p, dtype=_F32)
                copy.copy_(value)
                out[key] = copy
            elif torch.is_tensor(value):
                out[key] = value.to(device=p.device, copy=True)
            else:
                out[key] = value
        return self._fo_import(p, out)

    def _fo_reset(self, state):
        """Install a new internal state; every cached bucket is dropped."""
        self._fo_state = defaultdict(dict, state)
        self.__dict__["_fo_seen"] = set()
        self._fo_buckets = {}
        self._fo_norm_caches = {}
        self._fo_epoch = getattr(self, "_fo_epoch", 0) + 1

    # ------------------------------------------------------------ pickling / deepcopy

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def __setstate__(self, state):
        state = dict(state)
        internal = state.pop("_fo_state", None)
        if internal is None:  # torch's layout: {"defaults", "state", "param_groups"}
            internal = state.pop("state", {})
        super().__setstate__(state)
        self._fo_backends = {}
        self._fo_reset(internal)
