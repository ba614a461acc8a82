"""An independent NumPy statement of the lean Adam step (docs/lean_states.md), used as the
reference of the lean kernel tests: uint32 arrays for the random bits (NumPy wraps), float32
arrays for the element math (every NumPy float32 operation is one IEEE-rounded operation,
np.sqrt included), Python floats (IEEE double) for the per-tensor coefficients.

Everything is flat: a tensor is the 1-D array of its elements in memory order."""

from __future__ import annotations

import numpy as np
import torch

U32 = np.uint32
F32 = np.float32
MASK32 = 0xFFFFFFFF
BLOCK = 256


# ------------------------------------------------------------------ random bits

def fmix32(h):
    h = np.asarray(h, dtype=U32)
    with np.errstate(over="ignore"):  # uint32 products wrap, as intended
        h = h ^ (h >> U32(16))
        h = h * U32(0x85EBCA6B)
        h = h ^ (h >> U32(13))
        h = h * U32(0xC2B2AE35)
        return h ^ (h >> U32(16))


def key(seed, stream, step, purpose) -> int:
    """Per-tensor key; purpose 1 = param bits, 2 = state bits."""
    k = int(fmix32(seed & MASK32))
    k = int(fmix32(k ^ stream))
    k = int(fmix32((k + step) & MASK32))
    return int(fmix32(k ^ purpose))


def element_bits(k, numel, first=0):
    idx = np.arange(first, first + numel, dtype=np.uint64)
    high = fmix32(((k + (idx >> np.uint64(32))) & np.uint64(MASK32)).astype(U32))
    return fmix32((idx & np.uint64(MASK32)).astype(U32) ^ high)


# ------------------------------------------------------------------ stochastic rounding

def f32_bits(x):
    return np.ascontiguousarray(x, dtype=F32).view(U32)


def sr_bf16(x, r16):
    """fp32 -> bf16 bits: add 16 random bits below bf16's last bit and truncate."""
    u = f32_bits(x).astype(np.uint64)
    out = (u + r16.astype(np.uint64)) >> np.uint64(16)
    nan = (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
    return np.where(nan, (u >> np.uint64(16)) | np.uint64(0x40), out).astype(np.uint16)


def sr_fp16(x, r):
    """fp32 -> fp16 bits from the definition: the fp16 neighbours below and above |x| (its
    fp16 quantum q = 2^max(e-10, -24), e = floor(log2 |x|)); round up when the dropped part,
    in fp32 ulps, plus the top random bits reaches a whole quantum.  Below 2^-24: up when
    |x| * 2^48 > (r >> 8).  NaN -> quiet NaN, |x| >= 65536 -> inf."""
    x = np.asarray(x, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN lanes are replaced below
        return _sr_fp16(x, r)


def _sr_fp16(x, r):
    a = np.abs(x.astype(np.float64))
    sign = np.where(np.signbit(x), 0x8000, 0).astype(np.uint32)
    r = r.astype(np.int64)
    _, exp = np.frexp(np.where(a > 0, a, 1.0))
    e = exp.astype(np.int64) - 1                           # a in [2^e, 2^(e+1))
    quantum_exp = np.maximum(e - 10, -24)
    units = np.ldexp(a, -quantum_exp)                      # exact
    below = np.floor(units)
    dropped_bits = np.clip(quantum_exp - (e - 23), 1, 31)  # fp32 ulps per quantum: 2^this
    frac = np.rint((units - below) * np.ldexp(1.0, dropped_bits)).astype(np.int64)
    up = frac + (r >> (32 - dropped_bits)) >= (1 << dropped_bits)
    value = np.ldexp(below + up, quantum_exp)
    bits = value.astype(np.float16).view(np.uint16).astype(np.uint32)
    tiny = (a * 2.0 ** 48 > (r >> 8)).astype(np.uint32)
    bits = np.where(a < 2.0 ** -24, tiny, bits)
    bits = np.where(a >= 65536.0, 0x7C00, bits)
    bits = np.where(np.isnan(x), 0x7E00, bits)
    return (sign | bits).astype(np.uint16)


# ------------------------------------------------------------------ 8-bit dynamic maps

def map_value(q, levels):
    """value(q) = (7q - 6*2^e + 7) * 2^(2e - 3L), e = floor(log2 q); value(0) = 0."""
    if q == 0:
        return 0.0
    e = q.bit_length() - 1
    return (7 * q - 6 * 2 ** e + 7) * 2.0 ** (2 * e - 3 * levels)


SIGNED_MAGNITUDES = np.array([map_value(q, 7) for q in range(128)], dtype=F32)
UNSIGNED_VALUES = np.array([map_value(q, 8) for q in range(256)], dtype=F32)


def encode(y, levels):
    """Magnitude codes of y = |x| * 2^(3L) / absmax (float32 array), the formula of the spec."""
    y = np.asarray(y, dtype=F32)
    exp = (f32_bits(y) >> U32(23)).astype(np.int64) - 127
    e = np.minimum((np.maximum(exp, 0) * 11) >> 5, levels - 1)
    ny = y * np.ldexp(F32(1), -2 * e).astype(F32)
    p2 = np.ldexp(F32(1), e).astype(F32)
    c = np.ceil(((ny - p2) - F32(3.5)) * F32(1 / 7))
    c = np.minimum(np.maximum(c, F32(0)), p2)
    q = (1 << e) - 1 + c.astype(np.int64)
    t0 = F32(4.0) if levels == 7 else F32(0.0)
    return np.where(y > t0, np.maximum(q, 1), 0)


def quantize(x, signed):
    """(codes, absmax) of a flat float32 array, block by block."""
    levels = 7 if signed else 8
    x = np.asarray(x, dtype=F32)
    codes = np.zeros(len(x), dtype=np.int8 if signed else np.uint8)
    absmax = np.zeros((len(x) + BLOCK - 1) // BLOCK, dtype=F32)
    for b in range(len(absmax)):
        blk = x[b * BLOCK:(b + 1) * BLOCK]
        if np.isnan(blk).any() or np.isinf(blk).any():
            absmax[b] = np.nan
            continue
        amax = np.abs(blk).max()
        if amax < 2.0 ** -100:
            continue
        absmax[b] = amax
        scale = F32(2.0 ** (3 * levels)) / amax
        q = encode(np.abs(blk) * scale, levels)
        if signed:
            q = np.where(np.signbit(blk), -q, q)
        codes[b * BLOCK:(b + 1) * BLOCK] = q
    return codes, absmax


def dequantize(codes, absmax):
    signed = codes.dtype == np.int8
    c = codes.astype(np.int64)
    if signed:
        v = SIGNED_MAGNITUDES[np.minimum(np.abs(c), 127)]
        v = np.where(c < 0, -v, v)
    else:
        v = UNSIGNED_VALUES[c]
    return v * np.repeat(absmax, BLOCK)[:len(c)]


# ------------------------------------------------------------------ the step

def power(base, n):
    result = 1.0
    while n:
        if n & 1:
            result *= base
        n >>= 1
        if n:
            base *= base
    return result


def coefficients(lr, beta1, beta2, eps, weight_decay, decoupled, t):
    bc1, bc2 = 1.0 - power(beta1, t), 1.0 - power(beta2, t)
    return dict(b1=F32(beta1), omb1=F32(1.0 - beta1), b2=F32(beta2), omb2=F32(1.0 - beta2),
                nss=F32(-(lr / bc1)), rbc2=F32(1.0 / np.sqrt(bc2)), eps=F32(eps),
                l2=None if decoupled or weight_decay == 0 else F32(weight_decay),
                decay=F32(1.0 - lr * weight_decay) if decoupled else None)


def step(t, *, p, g, m, v, master, state, param_dtype, lr, beta1, beta2, eps, weight_decay,
         decoupled, maximize=False, inv_scale=None, clip_coef=None, stochastic=False, seed=0,
         stream=0):
    """One step of one tensor; ``t`` the step count after it.  p, g: float32 arrays (the
    param's values); m, v: float32 decoded moments or ("q8", codes, absmax) pairs; returns
    (p_fp32, param_bits or None, master, stored m, stored v) with stored moments as float32
    arrays (fp32), uint16 bf16 bits, or (codes, absmax)."""
    c = coefficients(lr, beta1, beta2, eps, weight_decay, decoupled, t)
    g = g.astype(F32)
    if inv_scale is not None:
        g = g * F32(inv_scale)
    if clip_coef is not None:
        g = g * F32(clip_coef)
    if maximize:
        g = -g
    p = (master if master is not None else p).astype(F32)
    if c["decay"] is not None:
        p = p * c["decay"]
    if c["l2"] is not None:
        g = g + c["l2"] * p
    m = c["b1"] * m + c["omb1"] * g
    v = c["b2"] * v + c["omb2"] * (g * g)
    denom = np.sqrt(v) * c["rbc2"] + c["eps"]
    p = p + (c["nss"] * m) / denom
    n = len(p)
    if state == "bf16":
        r = element_bits(key(seed, stream, t, 2), n)
        m_store, v_store = sr_bf16(m, r & U32(0xFFFF)), sr_bf16(v, r >> U32(16))
    elif state == "q8":
        m_store, v_store = quantize(m, True), quantize(v, False)
    else:
        m_store, v_store = m, v
    bits = None
    if param_dtype != torch.float32 and stochastic and master is None:
        r = element_bits(key(seed, stream, t, 1), n)
        bits = sr_bf16(p, r >> U32(16)) if param_dtype == torch.bfloat16 else sr_fp16(p, r)
    return p, bits, (p if master is not None else None), m_store, v_store
