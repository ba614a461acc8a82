"""Triton lean Adam/AdamW step: bf16 or 8-bit blockwise moments, stochastic rounding of
bf16/fp16 params (contract: docs/architecture.md, "Lean Adam"; semantics and the exact
integer / fp32 operations: docs/lean_states.md, the same as math_lean.h of the cpu and
cuda kernels and torch_lean.py, so every backend gives the same bits).

    g' = ((g * inv_scale) * clip_coef) * (maximize ? -1 : 1)
    AdamW: p = p * (1 - lr*wd)        Adam: g' = g' + wd*p
    m = b1*m + (1-b1)*g'              v = b2*v + (1-b2)*(g'*g')
    p = p + (-lr/(1-b1^t) * m) / (sqrt(v) * (1/sqrt(1-b2^t)) + eps)

Every operation is rounded once: IEEE div_rn / sqrt_rn, and the kernels are launched with
``enable_fp_fusion=False`` so that no multiply-add is contracted on a GPU.  The per-tensor
coefficients are formed in fp64 from the exact float64 hyper-parameters (passed as their
bit patterns), b^t by repeated squaring.  Moments: bf16 stored with stochastic rounding;
8-bit: one program handles whole 256-element blocks (BLOCK = 256): decode, update, block
absmax, encode.  skip > 0: every program returns before any load or store.

Launches: one per batch of at most MAX_TENSORS tensors, one program per chunk of
CHUNK_SIZE elements (a power of two, >= 256 for 8-bit moments), each looping over the
CHUNK // BLOCK blocks of its chunk (a constant trip count; blocks past the tensor's end are
skipped by a scalar test).  Step counters are written once per tensor after every program
of the tensor read it (arrival counters, as in optim.py).

Traffic per element (B = bytes of a param): reads g, p (2B) + moments, writes p (B) +
moments: fp32 moments 16 B, bf16 8 B, 8-bit 4 B (+ 16 B of absmax per 256 elements).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from fusedopt.backends import _lean_tables as lean_tables
from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends.triton import lean_math as lm
from fusedopt.backends.triton import multi_tensor as mt
from fusedopt.backends.triton.cross_entropy import _cast_for
from fusedopt.backends.triton.optim import _commit_once, _grad_scale

__all__ = ["lean_adam_step"]

OPS: frozenset[str] = frozenset({"lean_adam"})

QUANT_BLOCK = 256

# static table columns
COL_NUMEL, COL_PARAM, COL_M, COL_V = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
COL_M_ABSMAX, COL_V_ABSMAX, COL_MASTER = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6)
COL_STEP, COL_STREAM, COL_NCHUNKS = tl.constexpr(7), tl.constexpr(8), tl.constexpr(9)
NCOLS = tl.constexpr(10)
BLOCK_OF_CODES = tl.constexpr(256)  # QUANT_BLOCK, for the kernels


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _load_moments(m_ptr, v_ptr, ma_ptr, va_ptr, idx, mask, block, STATE: tl.constexpr):
    if STATE == 2:
        mc = tl.load(m_ptr + idx, mask=mask, other=0).to(tl.int32)
        vc = tl.load(v_ptr + idx, mask=mask, other=0).to(tl.int32)
        m = lm.dynamic_value(tl.minimum(tl.abs(mc), 127), 7)
        m = tl.where(mc < 0, -m, m) * tl.load(ma_ptr + block)
        v = lm.dynamic_value(vc, 8) * tl.load(va_ptr + block)
    elif STATE == 1:
        mb = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.uint16, bitcast=True)
        vb = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.uint16, bitcast=True)
        m = lm.as_float(mb.to(tl.uint32) << 16)
        v = lm.as_float(vb.to(tl.uint32) << 16)
    else:
        m = tl.load(m_ptr + idx, mask=mask, other=0.0)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)
    return m, v


@triton.jit
def _block_absmax(x, mask):
    """The stored absmax of a block: NaN if it holds a NaN/inf, 0 below 2^-100."""
    a = tl.where(mask, tl.abs(x), 0.0)
    amax = tl.max(a, axis=0)
    bad = tl.max(tl.where(a != a, 1, 0), axis=0)
    amax = tl.where((bad > 0) | (amax > 3.4028234663852886e38), float("nan"), amax)
    return tl.where(amax < 7.888609052210118e-31, 0.0, amax)


@triton.jit
def _store_moments(m_ptr, v_ptr, ma_ptr, va_ptr, idx, mask, block, m, v, state_bits,
                   STATE: tl.constexpr):
    if STATE == 2:
        m_max = _block_absmax(m, mask)
        v_max = _block_absmax(v, mask)
        tl.store(ma_ptr + block, m_max)
        tl.store(va_ptr + block, v_max)
        m_ok = m_max >= 7.888609052210118e-31
        v_ok = v_max >= 7.888609052210118e-31
        m_scale = tl.div_rn(tl.full([], 2097152.0, tl.float32), tl.where(m_ok, m_max, 1.0))
        v_scale = tl.div_rn(tl.full([], 16777216.0, tl.float32), tl.where(v_ok, v_max, 1.0))
        # blocks without codes (absmax 0 or NaN) encode zeros: no NaN reaches the encoder
        mq = lm.dynamic_code(tl.where(m_ok, tl.where(mask, tl.abs(m), 0.0) * m_scale, 0.0), 7)
        mq = tl.where((lm.as_bits(m) >> 31) == 1, -mq, mq)
        vq = lm.dynamic_code(tl.where(v_ok, tl.where(mask, v, 0.0) * v_scale, 0.0), 8)
        tl.store(m_ptr + idx, mq.to(tl.int8), mask=mask)
        tl.store(v_ptr + idx, vq.to(tl.uint8), mask=mask)
    elif STATE == 1:
        mb = lm.round_bf16(m, state_bits & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        vb = lm.round_bf16(v, state_bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(m_ptr + idx, mb, mask=mask)
        tl.store(v_ptr + idx, vb, mask=mask)
    else:
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)


@triton.jit
def _store_param(p_ptr, master_ptr, idx, mask, p, param_bits, HAS_MASTER: tl.constexpr,
                 STOCHASTIC: tl.constexpr):
    if HAS_MASTER:
        tl.store(master_ptr + idx, p, mask=mask)
    if STOCHASTIC:
        if p_ptr.dtype.element_ty == tl.bfloat16:
            bits = lm.round_bf16(p, param_bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            bits = lm.round_fp16(p, param_bits).to(tl.uint16).to(tl.float16, bitcast=True)
        tl.store(p_ptr + idx, bits, mask=mask)
    else:
        tl.store(p_ptr + idx, _cast_for(p, p_ptr), mask=mask)


# hyper-parameter bits and the seed change from call to call: no value specialisation
@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "eps_bits",
                               "weight_decay_bits", "seed"])
def _lean_adam_kernel(static_ptr, grad_table_ptr, chunk_table_ptr, counter_ptr, base_p, base_m,
                      base_v, base_f32, lr_ptr, lr_bits, beta1_ptr, beta1_bits, beta2_ptr,
                      beta2_bits, eps_bits, weight_decay_bits, seed, inv_scale_ptr,
                      clip_coef_ptr, skip_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                      STATE: tl.constexpr, LR_TENSOR: tl.constexpr, BETA1_TENSOR: tl.constexpr,
                      BETA2_TENSOR: tl.constexpr, HAS_INV_SCALE: tl.constexpr,
                      HAS_CLIP: tl.constexpr, HAS_SKIP: tl.constexpr, L2: tl.constexpr,
                      DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                      HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr):
    # 1. a skipped step touches nothing
    if HAS_SKIP:
        if tl.load(skip_ptr) > 0:
            return
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunk_table_ptr + 2 * pid)
    start = tl.load(chunk_table_ptr + 2 * pid + 1)
    entry = static_ptr + row * NCOLS
    end = tl.minimum(start + CHUNK, tl.load(entry + COL_NUMEL))

    # 2. per-tensor coefficients from the incremented step (fp64, rounded once) and keys
    step_ptr = base_f32 + tl.load(entry + COL_STEP)
    t_new = tl.load(step_ptr) + 1.0
    t = t_new.to(tl.int64)
    lr = lm.hyper64(lr_ptr, lr_bits, LR_TENSOR)
    b1 = lm.hyper64(beta1_ptr, beta1_bits, BETA1_TENSOR)
    b2 = lm.hyper64(beta2_ptr, beta2_bits, BETA2_TENSOR)
    wd = lm.hyper64(lr_ptr, weight_decay_bits, False)
    bc1 = 1.0 - lm.pow_by_squaring(b1, t)
    bc2 = 1.0 - lm.pow_by_squaring(b2, t)
    beta1 = b1.to(tl.float32)
    one_minus_beta1 = (1.0 - b1).to(tl.float32)
    beta2 = b2.to(tl.float32)
    one_minus_beta2 = (1.0 - b2).to(tl.float32)
    neg_step_size = (-(lr / bc1)).to(tl.float32)
    inv_bc2_sqrt = (1.0 / tl.sqrt(bc2)).to(tl.float32)  # fp64 sqrt: IEEE-rounded
    eps = lm.hyper64(lr_ptr, eps_bits, False).to(tl.float32)
    decay = (1.0 - lr * wd).to(tl.float32)
    l2 = wd.to(tl.float32)
    inv_scale, clip_coef = _grad_scale(inv_scale_ptr, clip_coef_ptr, HAS_INV_SCALE, HAS_CLIP)
    stream = tl.load(entry + COL_STREAM).to(tl.uint32)
    seed32 = tl.cast(seed, tl.int64).to(tl.uint32)
    hi = (start >> 32).to(tl.uint32)
    param_high = lm.fmix32(lm.tensor_key(seed32, stream, t.to(tl.uint32), 1) + hi)
    state_high = lm.fmix32(lm.tensor_key(seed32, stream, t.to(tl.uint32), 2) + hi)
    p_ptr = base_p + tl.load(entry + COL_PARAM)
    g_ptr = base_p + tl.load(grad_table_ptr + row)
    m_ptr = base_m + tl.load(entry + COL_M)
    v_ptr = base_v + tl.load(entry + COL_V)
    ma_ptr = base_f32 + tl.load(entry + COL_M_ABSMAX)
    va_ptr = base_f32 + tl.load(entry + COL_V_ABSMAX)
    master_ptr = base_f32 + tl.load(entry + COL_MASTER)

    # 3. the blocks of the chunk (a constant trip count; past the end: skipped)
    for b in range(0, CHUNK // BLOCK):
        first = start + b * BLOCK
        if first < end:
            idx = first + tl.arange(0, BLOCK)
            mask = idx < end
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_INV_SCALE:
                g = g * inv_scale
            if HAS_CLIP:
                g = g * clip_coef
            if MAXIMIZE:
                g = -g
            if HAS_MASTER:
                p = tl.load(master_ptr + idx, mask=mask, other=0.0)
            else:
                p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            block = first // BLOCK_OF_CODES
            m, v = _load_moments(m_ptr, v_ptr, ma_ptr, va_ptr, idx, mask, block, STATE)
            if DECOUPLED:
                p = p * decay
            if L2:
                g = g + l2 * p
            m = beta1 * m + one_minus_beta1 * g
            v = beta2 * v + one_minus_beta2 * (g * g)
            denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
            p = p + tl.div_rn(neg_step_size * m, denom)
            lo = idx.to(tl.uint32)
            state_bits = lm.fmix32(lo ^ state_high)
            _store_moments(m_ptr, v_ptr, ma_ptr, va_ptr, idx, mask, block, m, v, state_bits,
                           STATE)
            param_bits = lm.fmix32(lo ^ param_high)
            _store_param(p_ptr, master_ptr, idx, mask, p, param_bits, HAS_MASTER, STOCHASTIC)

    # 4. the step counter, once per tensor
    _commit_once(step_ptr, t_new, counter_ptr + row, tl.load(entry + COL_NCHUNKS))


class LeanTables:
    """The device tables of one lean bucket: static rows, gradient offsets, chunks,
    arrival counters (the layout of multi_tensor.Tables, with one element base per dtype:
    param, exp_avg, exp_avg_sq and fp32)."""

    def __init__(self, key, params, exp_avgs, exp_avg_sqs, m_absmax, v_absmax, masters, steps,
                 streams, chunk_size, max_tensors):
        device = params[0].device
        n = len(params)
        self.key = key
        self.chunk_size = chunk_size
        self.base_p = torch.empty(mt.VECTOR_BYTES, dtype=params[0].dtype, device=device)
        self.base_m = torch.empty(mt.VECTOR_BYTES, dtype=exp_avgs[0].dtype, device=device)
        self.base_v = torch.empty(mt.VECTOR_BYTES, dtype=exp_avg_sqs[0].dtype, device=device)
        self.base_f32 = torch.empty(mt.VECTOR_BYTES, dtype=torch.float32, device=device)
        numel = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        n_chunks = ((numel + chunk_size - 1) // chunk_size).clamp_min(1)

        def offsets(column, base):
            if column is None:
                return torch.zeros(n, dtype=torch.int64)
            return torch.tensor(mt._offsets(column, base.data_ptr(), base.element_size()),
                                dtype=torch.int64)

        cols = [numel, offsets(params, self.base_p), offsets(exp_avgs, self.base_m),
                offsets(exp_avg_sqs, self.base_v), offsets(m_absmax, self.base_f32),
                offsets(v_absmax, self.base_f32), offsets(masters, self.base_f32),
                offsets(steps, self.base_f32), torch.tensor(streams, dtype=torch.int64),
                n_chunks]
        self.static = torch.stack(cols, dim=1).to(device, non_blocking=True)
        ends = torch.cumsum(n_chunks, 0)
        firsts = ends - n_chunks
        owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), n_chunks)
        starts = (torch.arange(int(ends[-1]), dtype=torch.int64) - firsts[owner]) * chunk_size
        self.chunks = torch.stack([owner % max_tensors, starts], dim=1).to(device, non_blocking=True)
        self.counters = torch.zeros(n, dtype=torch.int32, device=device)
        self.grads = torch.zeros(n, dtype=torch.int64, device=device)
        self.grad_ptrs: tuple = ()
        firsts_l, ends_l = firsts.tolist(), ends.tolist()
        self.batches = []
        for t0 in range(0, n, max_tensors):
            t1 = min(t0 + max_tensors, n)
            c0, c1 = firsts_l[t0], ends_l[t1 - 1]
            self.batches.append((self.static[t0:t1], self.grads[t0:t1], self.chunks[c0:c1],
                                 self.counters[t0:t1], c1 - c0))

    def set_grads(self, grads) -> None:
        ptrs = tuple(map(torch.Tensor.data_ptr, grads))
        if ptrs != self.grad_ptrs:
            offsets = mt._offsets(grads, self.base_p.data_ptr(), self.base_p.element_size())
            self.grads.copy_(torch.tensor(offsets, dtype=torch.int64), non_blocking=True)
            self.grad_ptrs = ptrs


def _tables(cache, verified, params, grads, exp_avgs, exp_avg_sqs, m_absmax, v_absmax, masters,
            steps, streams, chunk_size):
    """The tables of a verified bucket (``_optim_boundary.verify_update``), rebuilt when an
    address, a size, the stream ids or the launch constants changed."""
    key = (chunk_size, mt.MAX_TENSORS, verified.numels, verified.ptr_key, streams,
           params[0].dtype, params[0].device)
    tables = cache.get("lean_adam")
    if tables is None or tables.key != key:
        tables = LeanTables(key, params, exp_avgs, exp_avg_sqs, m_absmax, v_absmax, masters,
                            steps, streams, chunk_size, mt.MAX_TENSORS)
        cache["lean_adam"] = tables
    tables.set_grads(grads)
    return tables


def _hyper_args(value, what, dummy):
    """(pointer, float64 bits, is_tensor) of a hyper-parameter (float or 0-dim tensor)."""
    value = boundary.scalar(value, what, dummy.device)
    if torch.is_tensor(value):
        return value, 0, True
    return dummy, _f64_bits(value), False


def lean_adam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
                   master_params, steps, streams, *, lr, beta1, beta2, eps, weight_decay,
                   maximize, decoupled, stochastic_rounding, seed, inv_scale, clip_coef, skip,
                   cache):
    """One lean Adam/AdamW step over a bucket (contract: docs/architecture.md); every tensor
    is verified at the kernel boundary first."""
    if not params:
        return
    state = lean_tables.state_code(exp_avgs)
    vectors = lean_tables.boundary_lists(exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                                         exp_avg_sq_absmaxes, master_params, state)
    verified = boundary.verify_update(cache, params, grads, vectors, (("steps", steps),),
                                      device_types=("cuda", "cpu"))
    streams, seed = lean_tables.streams_and_seed(streams, seed, len(params))
    chunk = max(mt.CHUNK_SIZE, QUANT_BLOCK) if state == 2 else mt.CHUNK_SIZE
    block = QUANT_BLOCK if state == 2 else min(mt.BLOCK_SIZE, chunk)
    tables = _tables(cache, verified, params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                     exp_avg_sq_absmaxes, master_params, steps, streams, chunk)
    dummy = tables.base_f32
    lr_ptr, lr_bits, lr_tensor = _hyper_args(lr, "lr", dummy)
    b1_ptr, b1_bits, b1_tensor = _hyper_args(beta1, "beta1", dummy)
    b2_ptr, b2_bits, b2_tensor = _hyper_args(beta2, "beta2", dummy)
    inv_scale, clip_coef, skip = (boundary.scalar(value, what, dummy.device) for value, what
                                  in ((inv_scale, "inv_scale"), (clip_coef, "clip_coef"),
                                      (skip, "skip")))
    low_precision = params[0].dtype != torch.float32
    for static, grad_table, chunk_table, counters, n_chunks in tables.batches:
        _lean_adam_kernel[(n_chunks,)](
            static, grad_table, chunk_table, counters, tables.base_p, tables.base_m,
            tables.base_v, tables.base_f32, lr_ptr, lr_bits, b1_ptr, b1_bits, b2_ptr, b2_bits,
            _f64_bits(eps), _f64_bits(weight_decay), seed,
            dummy if inv_scale is None else inv_scale, dummy if clip_coef is None else clip_coef,
            dummy if skip is None else skip, CHUNK=chunk, BLOCK=block, STATE=state,
            LR_TENSOR=lr_tensor, BETA1_TENSOR=b1_tensor, BETA2_TENSOR=b2_tensor,
            HAS_INV_SCALE=inv_scale is not None, HAS_CLIP=clip_coef is not None,
            HAS_SKIP=skip is not None, L2=(not decoupled) and weight_decay != 0,
            DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize),
            HAS_MASTER=master_params is not None,
            STOCHASTIC=bool(stochastic_rounding) and low_precision and master_params is None,
            enable_fp_fusion=False)
