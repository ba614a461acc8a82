"""Triton multi-tensor Adam/AdamW and SGD steps with in-kernel unscale, clipping and skip
(contracts: docs/architecture.md, "Optimizers"; tables and chunks: multi_tensor.py).

The gradient used is g' = ((g * inv_scale) * clip_coef), negated with `maximize`.  When
`skip > 0` every program returns before any load or store, so a skipped step leaves params,
states and counters bit-identical.  All math is fp32; low-precision params are read as
fp32 (or the fp32 master is read instead) and rounded once when stored.

Adam, per tensor with step counter t (incremented; torch.optim.Adam's formulas):
    bias corrections in fp64 from the fp64 hyper-parameters, rounded once to fp32:
        step_size = lr / (1 - beta1^t),  bc2_sqrt = sqrt(1 - beta2^t)
    per element:
        AdamW: p = p * (1 - lr*wd)               Adam: g' = g' + wd*p
        m = lerp(m, g', 1 - beta1);  v = v*beta2 + (1 - beta2)*g'*g'
        v_used = max(v_max, v) (amsgrad, also stored) else v
        p = p - step_size * m / (sqrt(v_used) / bc2_sqrt + eps)
SGD (torch.optim.SGD):
    d = g' + wd*p;  buf = d on the first step, else momentum*buf + (1 - dampening)*d
    p = p - lr * (d + momentum*buf if nesterov else buf)

Float hyper-parameters reach the kernel as two fp32 halves (hi + lo) and are rebuilt in
fp64, so beta^t and lr/(1 - beta1^t) are formed like torch's Python-float arithmetic;
tensor hyper-parameters are loaded on the device (no host sync).

Per-tensor counters (Adam `steps`, SGD `initialized`) are read by every program of their
tensor and must be written exactly once, after all of them read it: a tensor of one chunk
writes it directly; otherwise each program increments an int32 arrival counter of the
tensor and the last to arrive stores the new step / flag and resets the arrival counter.
(An integer atomic only orders the programs; every result is independent of that order.)

Traffic per element, b = bytes of a param/grad element (fp32 states):
    Adam:  reads g, p, m, v (2b + 8)   writes p, m, v (b + 8)   amsgrad: +4 read, +4 written
    SGD:   reads g, p (2b)             writes p (b)             momentum: +4 read, +4 written
    master weights: the fp32 master is read instead of p (4 - b more) and written (+4)
e.g. fp32 AdamW with clipping and a loss scale: the norm pass reads 4 B, the update 16 B and
writes 12 B: 32 B per parameter per step.  One launch per batch of tensors (multi_tensor.py).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends.triton import multi_tensor as mt
from fusedopt.backends.triton._interpreter import loop_bound
from fusedopt.backends.triton.multi_tensor import (
    COL_NCHUNKS,
    chunk_bounds,
    load,
    multi_tensor_norm,
    store,
    vector_ptr,
)

__all__ = ["multi_tensor_norm", "adam_step", "sgd_step"]

# ops implemented by this module
OPS: frozenset[str] = frozenset({"adam", "sgd"})
# device types the launchers take (CPU tensors run under TRITON_INTERPRET=1)
_DEVICE_TYPES = ("cuda", "cpu")

# static table columns (multi_tensor.Tables: addresses start at column 2)
ADAM_PARAM, ADAM_EXP_AVG, ADAM_EXP_AVG_SQ = tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
ADAM_MAX_EXP_AVG_SQ, ADAM_MASTER, ADAM_STEP = tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
SGD_PARAM, SGD_BUF, SGD_MASTER, SGD_INIT = (tl.constexpr(2), tl.constexpr(3), tl.constexpr(4),
                                            tl.constexpr(5))


def _fp32(x: float) -> float:
    """`x` rounded to the nearest fp32 value."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _scalar_args(value, what, dummy):
    """(pointer, hi, lo, is_tensor) for a hyper-parameter that is a float or a 0-dim tensor:
    a float x is passed as hi = fp32(x), lo = fp32(x - hi), with hi + lo = x to ~2^-48."""
    value = boundary.scalar(value, what, dummy.device)
    if torch.is_tensor(value):
        return value, 0.0, 0.0, True
    hi = _fp32(float(value))
    return dummy, hi, _fp32(float(value) - hi), False


@triton.jit
def _scalar64(ptr, hi, lo, IS_TENSOR: tl.constexpr):
    if IS_TENSOR:
        value = tl.load(ptr).to(tl.float64)
    else:
        value = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    return value


@triton.jit
def _pow_int(base, n):
    """base**n (fp64 base, integer n >= 0) by repeated squaring: a few fp64 products."""
    result = tl.full([], 1.0, tl.float64)
    while n > 0:
        result = tl.where((n & 1) == 1, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def _grad_scale(inv_scale_ptr, clip_coef_ptr, HAS_INV_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """(inv_scale, clip_coef) as fp32 scalars (1 when absent)."""
    inv_scale = 1.0
    clip_coef = 1.0
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr)
    if HAS_CLIP:
        clip_coef = tl.load(clip_coef_ptr)
    return inv_scale, clip_coef


@triton.jit
def _used_grad(g_ptr, idx, end, inv_scale, clip_coef, HAS_INV_SCALE: tl.constexpr,
               HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr, MASKED: tl.constexpr):
    """((g * inv_scale) * clip_coef), negated when maximizing, in fp32."""
    g = load(g_ptr, idx, end, MASKED)
    if HAS_INV_SCALE:
        g = g * inv_scale
    if HAS_CLIP:
        g = g * clip_coef
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _commit_once(target_ptr, value, counter_ptr, n_chunks):
    """Store the per-tensor `value` once every program of the tensor has read the old one."""
    if n_chunks == 1:
        tl.store(target_ptr, value)
    else:
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1)
        if arrived == n_chunks - 1:
            tl.store(counter_ptr, 0)
            tl.store(target_ptr, value)


@triton.jit
def _adam_block(idx, end, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, inv_scale, clip_coef,
                neg_step_size, bc2_sqrt, m_weight, beta2, v_weight, decay, eps, weight_decay,
                HAS_INV_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_WD: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_MASTER: tl.constexpr, MASKED: tl.constexpr):
    g = _used_grad(g_ptr, idx, end, inv_scale, clip_coef, HAS_INV_SCALE, HAS_CLIP, MAXIMIZE,
                   MASKED)
    if HAS_MASTER:
        p = load(master_ptr, idx, end, MASKED)
    else:
        p = load(p_ptr, idx, end, MASKED)
    if HAS_WD:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    # m = lerp(m, g, w) in torch's two-sided form
    m = load(m_ptr, idx, end, MASKED)
    diff = g - m
    m = tl.where(m_weight < 0.5, m + m_weight * diff, g - diff * (1.0 - m_weight))
    v = load(v_ptr, idx, end, MASKED) * beta2 + v_weight * g * g
    v_used = v
    if AMSGRAD:
        v_used = tl.maximum(load(vmax_ptr, idx, end, MASKED), v, propagate_nan=tl.PropagateNan.ALL)
        store(vmax_ptr, idx, end, v_used, MASKED)
    denom = tl.div_rn(tl.sqrt_rn(v_used), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    store(m_ptr, idx, end, m, MASKED)
    store(v_ptr, idx, end, v, MASKED)
    if HAS_MASTER:
        store(master_ptr, idx, end, p, MASKED)
    store(p_ptr, idx, end, p, MASKED)


@triton.jit
def _adam_kernel(static_ptr, grad_table_ptr, chunk_table_ptr, counter_ptr, base_ptr, base_f32_ptr,
                 lr_ptr, lr_hi, lr_lo, beta1_ptr, beta1_hi, beta1_lo, beta2_ptr, beta2_hi, beta2_lo,
                 eps, weight_decay, inv_scale_ptr, clip_coef_ptr, skip_ptr,
                 NCOLS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 ALIGNED: tl.constexpr, VEC: tl.constexpr,
                 LR_TENSOR: tl.constexpr, BETA1_TENSOR: tl.constexpr, BETA2_TENSOR: tl.constexpr,
                 HAS_INV_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_SKIP: tl.constexpr,
                 HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr):
    # 1. a skipped step touches nothing
    if HAS_SKIP:
        if tl.load(skip_ptr) > 0:
            return
    row, entry, start, n_full, end = chunk_bounds(chunk_table_ptr, static_ptr, NCOLS, CHUNK, BLOCK)

    # 2. per-tensor scalars from the incremented step, in fp64, rounded once
    step_ptr = base_f32_ptr + tl.load(entry + ADAM_STEP)
    t = tl.load(step_ptr) + 1.0
    lr = _scalar64(lr_ptr, lr_hi, lr_lo, LR_TENSOR)
    beta1 = _scalar64(beta1_ptr, beta1_hi, beta1_lo, BETA1_TENSOR)
    beta2 = _scalar64(beta2_ptr, beta2_hi, beta2_lo, BETA2_TENSOR)
    neg_step_size = (-lr / (1.0 - _pow_int(beta1, t.to(tl.int32)))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - _pow_int(beta2, t.to(tl.int32))).to(tl.float32)
    m_weight = (1.0 - beta1).to(tl.float32)
    v_weight = (1.0 - beta2).to(tl.float32)
    decay = (1.0 - lr * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    inv_scale, clip_coef = _grad_scale(inv_scale_ptr, clip_coef_ptr, HAS_INV_SCALE, HAS_CLIP)
    p_ptr = vector_ptr(entry + ADAM_PARAM, base_ptr, ALIGNED, VEC)
    g_ptr = vector_ptr(grad_table_ptr + row, base_ptr, ALIGNED, VEC)
    m_ptr = vector_ptr(entry + ADAM_EXP_AVG, base_f32_ptr, ALIGNED, 4)
    v_ptr = vector_ptr(entry + ADAM_EXP_AVG_SQ, base_f32_ptr, ALIGNED, 4)
    vmax_ptr = vector_ptr(entry + ADAM_MAX_EXP_AVG_SQ, base_f32_ptr, ALIGNED, 4)
    master_ptr = vector_ptr(entry + ADAM_MASTER, base_f32_ptr, ALIGNED, 4)

    # 3. the update: full blocks unmasked, then the tail
    for i in range(0, loop_bound(n_full)):
        _adam_block(start + i * BLOCK + tl.arange(0, BLOCK), end, p_ptr, g_ptr, m_ptr, v_ptr,
                    vmax_ptr, master_ptr, inv_scale, clip_coef, neg_step_size, bc2_sqrt, m_weight,
                    beta2.to(tl.float32), v_weight, decay, eps, weight_decay, HAS_INV_SCALE,
                    HAS_CLIP, HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, HAS_MASTER, False)
    tail = start + n_full * BLOCK
    if tail < end:
        _adam_block(tail + tl.arange(0, BLOCK), end, p_ptr, g_ptr, m_ptr, v_ptr,
                    vmax_ptr, master_ptr, inv_scale, clip_coef, neg_step_size, bc2_sqrt, m_weight,
                    beta2.to(tl.float32), v_weight, decay, eps, weight_decay, HAS_INV_SCALE,
                    HAS_CLIP, HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, HAS_MASTER, True)

    # 4. the step counter, once per tensor
    _commit_once(step_ptr, t, counter_ptr + row, tl.load(entry + COL_NCHUNKS))


@triton.jit
def _sgd_block(idx, end, p_ptr, g_ptr, buf_ptr, master_ptr, inv_scale, clip_coef, neg_lr,
               momentum, dampening_weight, weight_decay, was_initialized,
               HAS_INV_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_WD: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_MASTER: tl.constexpr, MASKED: tl.constexpr):
    d = _used_grad(g_ptr, idx, end, inv_scale, clip_coef, HAS_INV_SCALE, HAS_CLIP, MAXIMIZE,
                   MASKED)
    if HAS_MASTER:
        p = load(master_ptr, idx, end, MASKED)
    else:
        p = load(p_ptr, idx, end, MASKED)
    if HAS_WD:
        d = d + weight_decay * p
    if HAS_MOMENTUM:
        buf = load(buf_ptr, idx, end, MASKED)
        buf = tl.where(was_initialized, buf * momentum + dampening_weight * d, d)
        store(buf_ptr, idx, end, buf, MASKED)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    p = p + neg_lr * d
    if HAS_MASTER:
        store(master_ptr, idx, end, p, MASKED)
    store(p_ptr, idx, end, p, MASKED)


@triton.jit
def _sgd_kernel(static_ptr, grad_table_ptr, chunk_table_ptr, counter_ptr, base_ptr, base_f32_ptr,
                lr_ptr, lr_value, momentum, dampening_weight, weight_decay,
                inv_scale_ptr, clip_coef_ptr, skip_ptr,
                NCOLS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                ALIGNED: tl.constexpr, VEC: tl.constexpr, LR_TENSOR: tl.constexpr,
                HAS_INV_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_SKIP: tl.constexpr,
                HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr):
    # 1. a skipped step touches nothing
    if HAS_SKIP:
        if tl.load(skip_ptr) > 0:
            return
    row, entry, start, n_full, end = chunk_bounds(chunk_table_ptr, static_ptr, NCOLS, CHUNK, BLOCK)

    # 2. per-tensor scalars
    if LR_TENSOR:
        neg_lr = -tl.load(lr_ptr)
    else:
        neg_lr = -lr_value
    inv_scale, clip_coef = _grad_scale(inv_scale_ptr, clip_coef_ptr, HAS_INV_SCALE, HAS_CLIP)
    p_ptr = vector_ptr(entry + SGD_PARAM, base_ptr, ALIGNED, VEC)
    g_ptr = vector_ptr(grad_table_ptr + row, base_ptr, ALIGNED, VEC)
    buf_ptr = vector_ptr(entry + SGD_BUF, base_f32_ptr, ALIGNED, 4)
    master_ptr = vector_ptr(entry + SGD_MASTER, base_f32_ptr, ALIGNED, 4)
    init_ptr = base_f32_ptr + tl.load(entry + SGD_INIT)
    was_initialized = False
    if HAS_MOMENTUM:
        was_initialized = tl.load(init_ptr) > 0

    # 3. the update: full blocks unmasked, then the tail
    for i in range(0, loop_bound(n_full)):
        _sgd_block(start + i * BLOCK + tl.arange(0, BLOCK), end, p_ptr, g_ptr, buf_ptr, master_ptr,
                   inv_scale, clip_coef, neg_lr, momentum, dampening_weight, weight_decay,
                   was_initialized, HAS_INV_SCALE, HAS_CLIP, HAS_WD, HAS_MOMENTUM, NESTEROV,
                   MAXIMIZE, HAS_MASTER, False)
    tail = start + n_full * BLOCK
    if tail < end:
        _sgd_block(tail + tl.arange(0, BLOCK), end, p_ptr, g_ptr, buf_ptr, master_ptr,
                   inv_scale, clip_coef, neg_lr, momentum, dampening_weight, weight_decay,
                   was_initialized, HAS_INV_SCALE, HAS_CLIP, HAS_WD, HAS_MOMENTUM, NESTEROV,
                   MAXIMIZE, HAS_MASTER, True)

    # 4. the momentum buffer now holds a value, once per tensor
    if HAS_MOMENTUM:
        _commit_once(init_ptr, 1.0, counter_ptr + row, tl.load(entry + COL_NCHUNKS))


def _common_flags(inv_scale, clip_coef, skip, dummy):
    """Pointer arguments and presence flags of the device scalars shared by both kernels."""
    inv_scale, clip_coef, skip = (boundary.scalar(value, what, dummy.device) for value, what
                                  in ((inv_scale, "inv_scale"), (clip_coef, "clip_coef"),
                                      (skip, "skip")))
    return dict(inv_scale_ptr=dummy if inv_scale is None else inv_scale,
                clip_coef_ptr=dummy if clip_coef is None else clip_coef,
                skip_ptr=dummy if skip is None else skip,
                HAS_INV_SCALE=inv_scale is not None, HAS_CLIP=clip_coef is not None,
                HAS_SKIP=skip is not None)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *,
              lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
              inv_scale, clip_coef, skip, cache):
    """One Adam/AdamW step over a bucket, one launch per batch of tensors (contract:
    docs/architecture.md)."""
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    v = boundary.verify_update(
        cache, params, grads,
        (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
         ("max_exp_avg_sqs", max_exp_avg_sqs), ("master_params", master_params)),
        (("steps", steps),), device_types=_DEVICE_TYPES)
    vectors = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, master_params)
    tables = mt.tables_for(cache, "adam", grads, vectors, (steps,),
                           verified=(v.numels, v.ptr_key, v.grad_ptrs))
    dummy = tables.base_f32
    lr_ptr, lr_hi, lr_lo, lr_tensor = _scalar_args(lr, "lr", dummy)
    b1_ptr, b1_hi, b1_lo, b1_tensor = _scalar_args(beta1, "beta1", dummy)
    b2_ptr, b2_hi, b2_lo, b2_tensor = _scalar_args(beta2, "beta2", dummy)
    flags = _common_flags(inv_scale, clip_coef, skip, dummy)
    options = mt.launch_options(tables, params[0].dtype)
    for batch in tables.batches:
        _adam_kernel[(batch.n_chunks,)](
            batch.static, batch.grads, batch.chunks, batch.counters, tables.base, tables.base_f32,
            lr_ptr, lr_hi, lr_lo, b1_ptr, b1_hi, b1_lo, b2_ptr, b2_hi, b2_lo,
            float(eps), float(weight_decay), **flags, **options,
            LR_TENSOR=lr_tensor, BETA1_TENSOR=b1_tensor, BETA2_TENSOR=b2_tensor,
            HAS_WD=weight_decay != 0, DECOUPLED=bool(decoupled), AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize), HAS_MASTER=master_params is not None)


def sgd_step(params, grads, momentum_buffers, master_params, initialized, *, lr, momentum,
             dampening, weight_decay, nesterov, maximize, inv_scale, clip_coef, skip, cache):
    """One SGD step over a bucket, one launch per batch of tensors (contract:
    docs/architecture.md)."""
    has_momentum = momentum != 0
    if has_momentum and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    v = boundary.verify_update(
        cache, params, grads,
        (("momentum_buffers", momentum_buffers), ("master_params", master_params)),
        (("initialized", initialized),), device_types=_DEVICE_TYPES)
    vectors = (params, momentum_buffers if has_momentum else None, master_params)
    tables = mt.tables_for(cache, "sgd", grads, vectors, (initialized if has_momentum else None,),
                           verified=(v.numels, v.ptr_key, v.grad_ptrs))
    dummy = tables.base_f32
    lr = boundary.scalar(lr, "lr", dummy.device)
    lr_tensor = torch.is_tensor(lr)
    flags = _common_flags(inv_scale, clip_coef, skip, dummy)
    options = mt.launch_options(tables, params[0].dtype)
    for batch in tables.batches:
        _sgd_kernel[(batch.n_chunks,)](
            batch.static, batch.grads, batch.chunks, batch.counters, tables.base, tables.base_f32,
            lr if lr_tensor else dummy, 0.0 if lr_tensor else float(lr),
            float(momentum), 1.0 - float(dampening), float(weight_decay), **flags, **options,
            LR_TENSOR=lr_tensor, HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
            HAS_MASTER=master_params is not None)
