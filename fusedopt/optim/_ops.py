"""The optimizer kernels as ``torch.library`` custom ops: what a step traced by
``torch.compile`` calls (``_traced``), where the eager step calls the backends directly.

``fusedopt::multi_tensor_norm``, ``fusedopt::adam_step``, ``fusedopt::lean_adam_step`` and
``fusedopt::sgd_step`` wrap the backend entry points of docs/architecture.md ("Optimizers") one to one.  Their schemas
declare every list they write (``mutates_args``), so functionalization and Inductor order
them like any in-place op; the fake implementations write nothing (the norm's returns an
empty (2,) tensor of the right dtype and device).  An absent list (``max_exp_avg_sqs``
without amsgrad, ``master_params`` without masters, ``momentum_buffers`` without momentum,
absmax lists without 8-bit moments) is an empty list; a hyper-parameter that may be a tensor is a float plus an optional
tensor (the tensor wins).

The implementations run eagerly, on the real tensors: the hyper-parameters are converted
as the eager step converts them (``_scalars``: a CPU tensor lr for CUDA params is read on
the host), and the `cpu`, `cuda` and `triton` launchers verify every tensor at the kernel
boundary (``backends/_optim_boundary.py``) before any address is read, exactly as for an
eager call.  The guards of a compiled step re-check every tensor's metadata, not its
storage (one freed in place keeps its shape), so a step first runs ``fusedopt::verify_step``
over all its buckets: a refusal comes before any op wrote anything, and every other op of
the step takes its result (``after``) so that nothing is ordered before it.  Their caches
(pointer tables, boundary records) live in a `CacheStore` owned by the optimizer, found
through the integer ``store`` argument, so they are kept across steps and freed with the
optimizer.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

from fusedopt import backends
from fusedopt.backends import _optim_boundary as boundary
from fusedopt.optim._scalars import hyper

_STORES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_STORE_IDS = itertools.count(1)


class CacheStore(dict):
    """The caches of one optimizer's compiled steps: (kind, group, device, dtype) -> dict."""

    __slots__ = ("__weakref__",)


def new_store() -> tuple[int, CacheStore]:
    """A fresh store and the id the custom ops find it by (the optimizer keeps the store)."""
    store, key = CacheStore(), next(_STORE_IDS)
    _STORES[key] = store
    return key, store


def _cache(store: int, kind: str, group: int, tensor: Tensor) -> dict:
    found = _STORES.get(store)
    if found is None:  # the optimizer is gone: an uncached call still verifies everything
        return {}
    return found.setdefault((kind, group, tensor.device, tensor.dtype), {})


def _backend(name: str):
    return backends.get(name)


def _optional(lst):
    return list(lst) if lst else None


def _scalar(value: float, tensor: Optional[Tensor], device, name: str):
    return hyper(tensor if tensor is not None else value, device, name)


# how verify_step's spec describes a list: 0 absent, 1 present (fp32, or a 0-dim counter),
# else present with the boundary's spec of a lean list (its dtypes, or absmax blocks)
LIST_SPECS = {2: (torch.int8,), 3: (torch.uint8,), 4: (torch.bfloat16,), 5: (torch.float32,),
              6: boundary.BLOCKS}
LIST_CODES = {spec: code for code, spec in LIST_SPECS.items()}


@torch.library.custom_op("fusedopt::verify_step", mutates_args=())
def verify_step(tensors: list[Tensor], spec: list[int], store: int,
                device: torch.device) -> Tensor:
    """Every bucket of a compiled step through the kernel boundary before any op writes.

    ``tensors`` holds the buckets' lists one after the other, ``spec`` per bucket: its
    group, its number of params n, its numbers of numel-sized and of 0-dim lists, then for
    each of these lists its code in `LIST_SPECS` (0: absent; else n tensors in
    ``tensors``).  A refusal raises here, before any op of the step ran.  Returns a 0-dim
    fp32 zero on ``device`` that the step's other ops take as ``after``, which orders them
    after this one."""
    at = k = 0
    while k < len(spec):
        group, n, n_vectors, n_scalars = (list(spec[k:k + 4]) + [-1] * 4)[:4]
        present = spec[k + 4:k + 4 + max(n_vectors, 0) + max(n_scalars, 0)]
        k += 4 + len(present)
        known = all(code in (0, 1) or (code in LIST_SPECS and i < n_vectors)
                    for i, code in enumerate(present))
        needed = n * (2 + sum(map(bool, present))) if n > 0 and known else -1
        if min(n_vectors, n_scalars) < 0 or len(present) != n_vectors + n_scalars \
                or needed < 0 or at + needed > len(tensors):
            raise ValueError(f"verify_step: spec {list(spec)} does not describe the "
                             f"{len(tensors)} tensors")
        params, grads = list(tensors[at:at + n]), list(tensors[at + n:at + 2 * n])
        at += 2 * n
        lists = []
        for i, code in enumerate(present):
            lst = list(tensors[at:at + n]) if code else None
            lists.append((f"list {i}", lst, LIST_SPECS[code]) if code > 1
                         else (f"list {i}", lst))
            at += n if code else 0
        try:
            boundary.verify_update(_cache(store, "verify", group, params[0]), params, grads,
                                   tuple(lists[:n_vectors]), tuple(lists[n_vectors:]),
                                   wide=params[0].dtype in boundary.WIDE_DTYPES)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"the compiled step's bucket of param group {group}: {exc}") \
                from None
    if at != len(tensors):
        raise ValueError(f"verify_step: spec {list(spec)} does not describe the "
                         f"{len(tensors)} tensors")
    return torch.zeros((), dtype=torch.float32, device=device)


@verify_step.register_fake
def _(tensors, spec, store, device):
    return torch.empty((), dtype=torch.float32, device=device)


@torch.library.custom_op("fusedopt::multi_tensor_norm", mutates_args=())
def multi_tensor_norm(tensors: list[Tensor], inv_scale: Optional[Tensor], backend: str,
                      store: int, after: Optional[Tensor]) -> Tensor:
    """``[Σ (g·inv_scale)², nonfinite]`` of one (device, dtype) of gradients (the backend's
    ``multi_tensor_norm``)."""
    tensors = list(tensors)
    return _backend(backend).multi_tensor_norm(tensors, inv_scale,
                                               _cache(store, "norm", -1, tensors[0]))


@multi_tensor_norm.register_fake
def _(tensors, inv_scale, backend, store, after):
    wide = tensors[0].dtype in (torch.float64, torch.complex128)  # the torch backend's fp64 norm
    return tensors[0].new_empty(2, dtype=torch.float64 if wide else torch.float32)


@torch.library.custom_op("fusedopt::adam_step", mutates_args=(
    "params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "steps"))
def adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
              master_params: list[Tensor], steps: list[Tensor], lr: float,
              lr_tensor: Optional[Tensor], beta1: float, beta1_tensor: Optional[Tensor],
              beta2: float, beta2_tensor: Optional[Tensor], eps: float, weight_decay: float,
              amsgrad: bool, maximize: bool, decoupled: bool, inv_scale: Optional[Tensor],
              clip_coef: Optional[Tensor], skip: Optional[Tensor], backend: str, store: int,
              group: int, after: Optional[Tensor]) -> None:
    """One Adam/AdamW step over a bucket (the backend's ``adam_step``)."""
    device = params[0].device
    _backend(backend).adam_step(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), _optional(max_exp_avg_sqs),
        _optional(master_params), list(steps), lr=_scalar(lr, lr_tensor, device, "lr"),
        beta1=_scalar(beta1, beta1_tensor, device, "betas[0]"),
        beta2=_scalar(beta2, beta2_tensor, device, "betas[1]"), eps=eps,
        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled,
        inv_scale=inv_scale, clip_coef=clip_coef, skip=skip,
        cache=_cache(store, "adam", group, params[0]))


@adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr,
      lr_tensor, beta1, beta1_tensor, beta2, beta2_tensor, eps, weight_decay, amsgrad,
      maximize, decoupled, inv_scale, clip_coef, skip, backend, store, group, after):
    return None


@torch.library.custom_op("fusedopt::lean_adam_step", mutates_args=(
    "params", "exp_avgs", "exp_avg_sqs", "exp_avg_absmaxes", "exp_avg_sq_absmaxes",
    "master_params", "steps"))
def lean_adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                   exp_avg_sqs: list[Tensor], exp_avg_absmaxes: list[Tensor],
                   exp_avg_sq_absmaxes: list[Tensor], master_params: list[Tensor],
                   steps: list[Tensor], streams: list[int], lr: float,
                   lr_tensor: Optional[Tensor], beta1: float, beta1_tensor: Optional[Tensor],
                   beta2: float, beta2_tensor: Optional[Tensor], eps: float,
                   weight_decay: float, maximize: bool, decoupled: bool,
                   stochastic_rounding: bool, seed: int, inv_scale: Optional[Tensor],
                   clip_coef: Optional[Tensor], skip: Optional[Tensor], backend: str,
                   store: int, group: int, after: Optional[Tensor]) -> None:
    """One Adam/AdamW step with memory-lean states over a bucket (the backend's
    ``lean_adam_step``)."""
    device = params[0].device
    _backend(backend).lean_adam_step(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
        _optional(exp_avg_absmaxes), _optional(exp_avg_sq_absmaxes), _optional(master_params),
        list(steps), list(streams), lr=_scalar(lr, lr_tensor, device, "lr"),
        beta1=_scalar(beta1, beta1_tensor, device, "betas[0]"),
        beta2=_scalar(beta2, beta2_tensor, device, "betas[1]"), eps=eps,
        weight_decay=weight_decay, maximize=maximize, decoupled=decoupled,
        stochastic_rounding=stochastic_rounding, seed=seed, inv_scale=inv_scale,
        clip_coef=clip_coef, skip=skip, cache=_cache(store, "lean_adam", group, params[0]))


@lean_adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
      master_params, steps, streams, lr, lr_tensor, beta1, beta1_tensor, beta2, beta2_tensor,
      eps, weight_decay, maximize, decoupled, stochastic_rounding, seed, inv_scale, clip_coef,
      skip, backend, store, group, after):
    return None


@torch.library.custom_op("fusedopt::sgd_step", mutates_args=(
    "params", "momentum_buffers", "master_params", "initialized"))
def sgd_step(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
             master_params: list[Tensor], initialized: list[Tensor], lr: float,
             lr_tensor: Optional[Tensor], momentum: float, dampening: float,
             weight_decay: float, nesterov: bool, maximize: bool, inv_scale: Optional[Tensor],
             clip_coef: Optional[Tensor], skip: Optional[Tensor], backend: str, store: int,
             group: int, after: Optional[Tensor]) -> None:
    """One SGD step over a bucket (the backend's ``sgd_step``)."""
    _backend(backend).sgd_step(
        list(params), list(grads), _optional(momentum_buffers), _optional(master_params),
        list(initialized), lr=_scalar(lr, lr_tensor, params[0].device, "lr"),
        momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize, inv_scale=inv_scale, clip_coef=clip_coef, skip=skip,
        cache=_cache(store, "sgd", group, params[0]))


@sgd_step.register_fake
def _(params, grads, momentum_buffers, master_params, initialized, lr, lr_tensor, momentum,
      dampening, weight_decay, nesterov, maximize, inv_scale, clip_coef, skip, backend, store,
      group, after):
    return None
