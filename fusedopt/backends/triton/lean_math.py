"""Element math of the Triton lean Adam kernel (lean_adam.py): the counter-based random
bits, stochastic rounding to bf16 / fp16 and the 8-bit dynamic maps -- the same integer
and fp32 operations as csrc/include/fusedopt/math_lean.h and fusedopt/backends/lean_math.py
(specification: docs/lean_states.md).  Integers are uint32 tensors (wrapping arithmetic);
floats are reinterpreted through their bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fmix32(h):
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def tensor_key(seed, stream, step, purpose: tl.constexpr):
    k = fmix32(fmix32(fmix32(fmix32(seed) ^ stream) + step) ^ tl.full([], purpose, tl.uint32))
    return k


@triton.jit
def as_bits(x):
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def as_float(u):
    return u.to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(x, r16):
    """fp32 -> bf16 bits (uint32) with 16 random bits; NaN -> quiet NaN."""
    u = as_bits(x)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, (u >> 16) | 0x40, (u + r16) >> 16)


@triton.jit
def round_fp16(x, r):
    """fp32 -> fp16 bits (uint32) with 32 random bits (see docs/lean_states.md)."""
    u = as_bits(x)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    biased = a >> 23
    d = tl.minimum(tl.where(biased >= 113, 13, 126 - biased), 23).to(tl.uint32)
    # the low d bits cleared by shifts (Triton 3.6's interpreter cannot take ~ of a uint32)
    up = ((a + (r >> (32 - d))) >> d) << d
    up_biased = up >> 23
    normal = ((up_biased - 112) << 10) | ((up >> 13) & 0x3FF)
    sub_shift = 126 - tl.minimum(tl.maximum(up_biased, 103), 112)
    subnormal = ((up & 0x7FFFFF) | 0x800000) >> sub_shift
    h = tl.where(up_biased >= 113, normal, subnormal)
    tiny = (as_float(a) * 281474976710656.0 > (r >> 8).to(tl.float32)).to(tl.uint32)
    h = tl.where(biased < 103, tiny, h)
    h = tl.where(a >= 0x47800000, 0x7C00, h)
    h = tl.where(a > 0x7F800000, 0x7E00, h)
    return sign | h


@triton.jit
def dynamic_value(q, LEVELS: tl.constexpr):
    """value(q) = (7q - 6*2^e + 7) * 2^(2e - 3L), e = floor(log2 q); value(0) = 0."""
    q = q.to(tl.int32)
    e = ((as_bits((q | 1).to(tl.float32)) >> 23) - 127).to(tl.int32)
    n = 7 * q - (6 << e) + 7
    shift = ((2 * e - 3 * LEVELS) << 23).to(tl.uint32)
    v = as_float(as_bits(n.to(tl.float32)) + shift)
    return tl.where(q == 0, 0.0, v)


@triton.jit
def dynamic_code(y, LEVELS: tl.constexpr):
    """The magnitude code (int32) of y = |x| * 2^(3L) / absmax."""
    exp = (as_bits(y) >> 23).to(tl.int32) - 127
    e = tl.minimum((tl.maximum(exp, 0) * 11) >> 5, LEVELS - 1)
    ny = y * as_float(((127 - 2 * e) << 23).to(tl.uint32))
    p2 = as_float(((127 + e) << 23).to(tl.uint32))
    c = tl.ceil(((ny - p2) - 3.5) * 0.142857149)
    c = tl.minimum(tl.maximum(c, 0.0), p2)
    q = (1 << e) - 1 + c.to(tl.int32)
    if LEVELS == 7:
        t0 = 4.0
    else:
        t0 = 0.0
    return tl.where(y > t0, tl.maximum(q, 1), 0)


@triton.jit
def pow_by_squaring(base, n):
    result = tl.full([], 1.0, tl.float64)
    for _ in tl.static_range(32):
        result = tl.where((n & 1) == 1, result * base, result)
        n = n >> 1
        base = tl.where(n != 0, base * base, base)
    return result


@triton.jit
def hyper64(ptr, bits, IS_TENSOR: tl.constexpr):
    if IS_TENSOR:
        value = tl.load(ptr).to(tl.float64)
    else:
        value = tl.cast(bits, tl.int64).to(tl.float64, bitcast=True)
    return value
