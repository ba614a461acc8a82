"""The element math of the lean optimizer states in PyTorch ops (docs/lean_states.md).

The same integer and fp32 operations as csrc/include/fusedopt/math_lean.h (the cpu and cuda
kernels) and the Triton kernels, so that every backend produces the same bits:

* random bits: ``fmix32`` (MurmurHash3's finalizer) of the element index mixed with a
  per-tensor key of (seed, stream, step, purpose), in int64 tensors holding uint32 values;
* stochastic rounding of fp32 values to bf16 / fp16;
* the 8-bit dynamic maps: encode (``dynamic_code``) and decode (``dynamic_value``), and the
  blockwise quantization of a moment (``quantize_blocks`` / ``dequantize_blocks``).

Used by the `torch` backend's ``lean_adam_step`` and by the optimizers' state conversions.
Nothing here reads a device value on the host.
"""

from __future__ import annotations

import torch

__all__ = ["QUANT_BLOCK", "SIGNED_LEVELS", "UNSIGNED_LEVELS", "PARAM_BITS", "STATE_BITS",
           "fmix32", "tensor_key", "element_bits", "round_bf16_stochastic",
           "round_fp16_stochastic", "dynamic_value", "dynamic_code", "quantize_blocks",
           "dequantize_blocks", "dynamic_map", "num_blocks", "flat_memory"]

QUANT_BLOCK = 256        # elements per absmax
SIGNED_LEVELS = 7        # first moment: int8 codes, magnitudes 0..127
UNSIGNED_LEVELS = 8      # second moment: uint8 codes 0..255
PARAM_BITS, STATE_BITS = 1, 2  # purposes of the random bits
MIN_ABSMAX = 2.0 ** -100  # blocks below it are stored as zeros
ONE_SEVENTH = 0.142857149  # fp32(1/7)

_I64 = torch.int64
_I32 = torch.int32
_F32 = torch.float32
_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 tensors holding uint32 values (no int64 overflow)."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def tensor_key(seed: int, stream: int, step: torch.Tensor, purpose: int) -> torch.Tensor:
    """fmix32(fmix32(fmix32(fmix32(seed) ^ stream) + step) ^ purpose); ``step`` an int64
    tensor (the step count after the update), any shape."""
    k = fmix32(torch.full_like(step, seed & _M32))
    k = fmix32(k ^ (stream & _M32))
    k = fmix32((k + step) & _M32)
    return fmix32(k ^ purpose)


def element_bits(key: torch.Tensor, numel: int) -> torch.Tensor:
    """The random bits of elements 0..numel-1: fmix32(lo32(k) ^ fmix32(key + hi32(k)))."""
    k = torch.arange(numel, dtype=_I64, device=key.device)
    high = fmix32((key + (k >> 32)) & _M32)
    return fmix32((k & _M32) ^ high)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The fp32 bit patterns of ``x`` as int64 values in [0, 2^32)."""
    return x.contiguous().view(_I32).to(_I64) & _M32


def _as_f32(bits: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) reinterpreted as fp32."""
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(_I32).view(_F32)


def _as_16bit(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 values in [0, 2^16) reinterpreted as bf16 / fp16."""
    return torch.where(bits >= 2 ** 15, bits - 2 ** 16, bits).to(torch.int16).view(dtype)


def round_bf16_stochastic(x: torch.Tensor, r16: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` to bf16: add the 16 random bits ``r16`` below bf16's precision, truncate.
    NaN becomes a quiet NaN as in the round-to-nearest conversion."""
    u = _bits(x)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = torch.where(is_nan, (u >> 16) | 0x40, (u + r16) >> 16)
    return _as_16bit(out, torch.bfloat16)


def round_fp16_stochastic(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` to fp16 with the 32 random bits ``r`` (see math_lean.h)."""
    u = _bits(x)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    biased = a >> 23
    d = torch.where(biased >= 113, 13, 126 - biased).clamp(max=23)
    up = (a + (r >> (32 - d))) & ~((1 << d) - 1)
    up_biased = up >> 23
    normal = ((up_biased - 112) << 10) | ((up >> 13) & 0x3FF)
    subnormal = ((up & 0x7FFFFF) | 0x800000) >> (126 - up_biased.clamp(103, 112))
    h = torch.where(up_biased >= 113, normal, subnormal)
    tiny = (_as_f32(a) * 2.0 ** 48 > (r >> 8).to(_F32)).to(_I64)
    h = torch.where(biased < 103, tiny, h)
    h = torch.where(a >= 0x47800000, 0x7C00, h)
    h = torch.where(a > 0x7F800000, 0x7E00, h)
    return _as_16bit(sign | h, torch.float16)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as fp32 (exact) for int64 exponents in [-126, 127]."""
    return _as_f32((exponent + 127) << 23)


def dynamic_value(q: torch.Tensor, levels: int) -> torch.Tensor:
    """value(q) = (7q - 6*2^e + 7) * 2^(2e - 3L), e = floor(log2 q), value(0) = 0 (fp32)."""
    q = q.to(_I64)
    e = (_bits((q | 1).to(_F32)) >> 23) - 127
    n = 7 * q - (6 << e) + 7
    v = n.to(_F32) * _pow2(2 * e - 3 * levels)
    return torch.where(q == 0, 0.0, v)


def dynamic_code(y: torch.Tensor, levels: int) -> torch.Tensor:
    """The magnitude code (int64) of y = |x| * 2^(3L) / absmax; see math_lean.h."""
    e = (((_bits(y) >> 23) - 127).clamp(min=0) * 11) >> 5
    e = e.clamp(max=levels - 1)
    ny = y * _pow2(-2 * e)
    p2 = _pow2(e)
    c = torch.ceil(((ny - p2) - 3.5) * ONE_SEVENTH).clamp(min=0.0)
    c = torch.minimum(c, p2)
    q = (1 << e) - 1 + c.to(_I64)
    t0 = 4.0 if levels == SIGNED_LEVELS else 0.0
    return torch.where(y > t0, q.clamp(min=1), 0)


def flat_memory(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the dense tensor ``x`` in memory order (element k = the k-th element
    of its storage from ``x.data_ptr()``), the order the kernels walk."""
    if x.is_contiguous():
        return x.view(-1)
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.size(d)))
    return x.permute(order).view(-1)


def num_blocks(numel: int) -> int:
    return (numel + QUANT_BLOCK - 1) // QUANT_BLOCK


def _blocks(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """The flat fp32 ``x`` padded to whole blocks, as (blocks, 256)."""
    flat = x.reshape(-1)
    pad = num_blocks(flat.numel()) * QUANT_BLOCK - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), fill)])
    return flat.view(-1, QUANT_BLOCK)


def quantize_blocks(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of the fp32 values ``x`` (1-D, in memory order): int8 codes for the
    signed map, uint8 for the unsigned one, one fp32 absmax per block of 256 elements.
    A block holding a NaN or inf gets absmax NaN and codes 0; a block whose largest
    magnitude is below 2^-100 gets absmax 0 and codes 0."""
    levels = SIGNED_LEVELS if signed else UNSIGNED_LEVELS
    blocks = _blocks(x.to(_F32))
    amax = blocks.abs().amax(dim=1)
    absmax = torch.where(amax.isfinite(), amax, float("nan"))
    absmax = torch.where(absmax < MIN_ABSMAX, 0.0, absmax)
    has_codes = absmax >= MIN_ABSMAX
    scale = torch.where(has_codes, torch.full_like(absmax, 2.0 ** (3 * levels)) / absmax, 0.0)
    q = dynamic_code(blocks.abs() * scale[:, None], levels)
    if signed:
        q = torch.where(_bits(blocks) >= 2 ** 31, -q, q)
    codes = q.reshape(-1)[: x.numel()].to(torch.int8 if signed else torch.uint8)
    return codes, absmax


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The fp32 values (1-D) of 1-D int8 (signed map) or uint8 (unsigned map) codes."""
    signed = codes.dtype == torch.int8
    c = codes.reshape(-1).to(_I64)
    q = c.abs().clamp(max=127) if signed else c
    v = dynamic_value(q, SIGNED_LEVELS if signed else UNSIGNED_LEVELS)
    if signed:
        v = torch.where(c < 0, -v, v)
    scale = absmax.repeat_interleave(QUANT_BLOCK)[: c.numel()]
    return v * scale


def dynamic_map(signed: bool, device=None) -> torch.Tensor:
    """The 256 map values (fp32) indexed by the code's byte (``codes.view(torch.uint8)``)."""
    byte = torch.arange(256, dtype=_I64, device=device)
    if signed:
        c = torch.where(byte >= 128, byte - 256, byte)
        v = dynamic_value(c.abs().clamp(max=127), SIGNED_LEVELS)
        return torch.where(c < 0, -v, v)
    return dynamic_value(byte, UNSIGNED_LEVELS)
