// Element math of the memory-lean Adam states, ONE copy for the CPU and CUDA kernels (the
// sibling of math_optim.h; docs/lean_states.md is the specification, and the `torch` and
// `triton` backends implement the same operations):
//
// * counter-based random bits: fmix32 (MurmurHash3's 32-bit finalizer) of the element
//   index mixed with a per-tensor key derived from (seed, stream, step, purpose);
// * stochastic rounding of fp32 to bf16 / fp16 (unbiased; deterministic given the bits);
// * the 8-bit dynamic maps: a magnitude code q in [0, 2^L) stands for
//   value(q) = (7q - 6*2^e + 7) * 2^(2e - 3L), e = floor(log2 q) (value(0) = 0), i.e.
//   level e spans (8^(e-L), 8^(e-L+1)] with 2^e evenly spaced values; L = 7 for the signed
//   first moment (int8, sign + magnitude), L = 8 for the unsigned second moment (uint8);
// * the lean Adam element update, written as separately rounded IEEE fp32 operations (no
//   fused multiply-add: mul_rn/add_rn below stop nvcc's contraction; the CPU build passes
//   -ffp-contract=off), so that every backend produces the same bits.
#pragma once
#include <cstdint>
#if !defined(__CUDACC__)
#include <cmath>
#include <cstring>
#endif

#include "fusedopt/math_optim.h"

namespace fusedopt::lean {

// ---------------------------------------------------------------- IEEE ops, never fused

#if defined(__CUDA_ARCH__)
FO_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
FO_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
FO_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
FO_HD float sqrt_rn(float a) { return __fsqrt_rn(a); }
FO_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
FO_HD double add_rn(double a, double b) { return __dadd_rn(a, b); }
FO_HD uint32_t f32_bits(float x) { return __float_as_uint(x); }
FO_HD float bits_f32(uint32_t u) { return __uint_as_float(u); }
#else
FO_HD float mul_rn(float a, float b) { return a * b; }
FO_HD float add_rn(float a, float b) { return a + b; }
FO_HD float div_rn(float a, float b) { return a / b; }
FO_HD float sqrt_rn(float a) { return ::sqrtf(a); }
FO_HD double mul_rn(double a, double b) { return a * b; }
FO_HD double add_rn(double a, double b) { return a + b; }
FO_HD uint32_t f32_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
FO_HD float bits_f32(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
#endif

// ---------------------------------------------------------------- random bits

enum RandomPurpose : uint32_t { kParamBits = 1, kStateBits = 2 };

FO_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The key of one tensor, step and purpose; `step` is the step count after the update.
FO_HD uint32_t tensor_key(uint32_t seed, uint32_t stream, uint32_t step, uint32_t purpose) {
  return fmix32(fmix32(fmix32(fmix32(seed) ^ stream) + step) ^ purpose);
}

// The 32 random bits of element k of a tensor: fmix32(lo32(k) ^ fmix32(key + hi32(k))).
// `high_key` = fmix32(key + hi32(k)) is the same for 2^32 consecutive elements (a chunk of
// a multi-tensor plan never straddles two such ranges); element_bits takes lo32(k).
FO_HD uint32_t high_key(uint32_t key, int64_t k) {
  return fmix32(key + static_cast<uint32_t>(static_cast<uint64_t>(k) >> 32));
}
FO_HD uint32_t element_bits(uint32_t high, uint32_t k_lo) { return fmix32(k_lo ^ high); }

// ---------------------------------------------------------------- stochastic rounding

// fp32 -> bf16 bits: add 16 random bits below bf16's precision, then truncate. Rounds away
// from zero with probability (dropped bits) / 2^16: unbiased. NaN -> quiet NaN (as the
// round-to-nearest conversion); inf stays inf.
FO_HD uint16_t round_bf16_stochastic(float x, uint32_t r16) {
  const uint32_t u = f32_bits(x);
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const uint32_t is_nan = 0u - uint32_t((u & 0x7fffffffu) > 0x7f800000u);
  return uint16_t((quiet_nan & is_nan) | (((u + r16) >> 16) & ~is_nan));
}

// fp32 -> fp16 bits with the 32 random bits r. The fp16 quantum of |x| is 2^d fp32 ulps,
// d = 13 for |x| >= 2^-14 and 126 - (biased exponent) in the fp16 subnormal range (14..23):
// add the top d bits of r below it, then truncate (exact: the result is an fp16 value,
// converted without rounding). Below 2^-24 the result is 2^-24 with probability
// ~|x| / 2^-24 (24-bit resolution), else 0. |x| >= 65536 -> inf; a value rounded up past
// 65504 becomes inf (the next step). NaN -> quiet NaN. Branch-free (masks).
FO_HD uint16_t round_fp16_stochastic(float x, uint32_t r) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t biased = a >> 23;
  uint32_t d = biased >= 113u ? 13u : 126u - biased;
  d = d > 23u ? 23u : d;
  const uint32_t mask = (1u << d) - 1u;
  const uint32_t up = (a + (r >> (32u - d))) & ~mask;
  const uint32_t ue = (up >> 23) - 112u;  // fp16 exponent field (0 for subnormal results)
  const uint32_t normal = (ue << 10) | ((up >> 13) & 0x3ffu);
  const uint32_t up_biased = (up >> 23) < 103u ? 103u : ((up >> 23) > 112u ? 112u : (up >> 23));
  const uint32_t subnormal = ((up & 0x7fffffu) | 0x800000u) >> (126u - up_biased);
  uint32_t h = (up >> 23) >= 113u ? normal : subnormal;
  const uint32_t tiny = mul_rn(bits_f32(a), 281474976710656.0f) > static_cast<float>(r >> 8);
  h = biased < 103u ? tiny : h;
  h = a >= 0x47800000u ? 0x7c00u : h;
  h = a > 0x7f800000u ? 0x7e00u : h;
  return uint16_t(sign | h);
}

// ---------------------------------------------------------------- 8-bit dynamic maps

constexpr int kQuantBlock = 256;        // elements per absmax
constexpr int kSignedLevels = 7;        // first moment: int8, magnitudes 0..127
constexpr int kUnsignedLevels = 8;      // second moment: uint8, codes 0..255
// Blocks whose largest magnitude is below 2^-100 are stored as zeros (so that 2^(3L)/absmax
// stays finite).
constexpr float kQuantMinAbsmax = 7.888609052210118e-31f;  // 2^-100

// floor(log2 q) of 1 <= q < 2^24, exactly (q is converted without rounding).
FO_HD uint32_t ilog2(uint32_t q) { return (f32_bits(static_cast<float>(q)) >> 23) - 127u; }

// value(q) of the L-level map, exact in fp32.
template <int L>
FO_HD float dynamic_value(uint32_t q) {
  const uint32_t e = ilog2(q | 1u);
  const int32_t n = 7 * int32_t(q) - (6 << e) + 7;
  const uint32_t shift = uint32_t(int32_t(2 * e) - 3 * L) << 23;  // 2^(2e - 3L), wraps
  const float v = bits_f32(f32_bits(static_cast<float>(n)) + shift);
  return q == 0 ? 0.0f : v;
}

// The magnitude code of y = |x| * 2^(3L) / absmax (0 <= y <= ~2^(3L)), nearest to a map value
// (ties and a 1-ulp band around the midpoints decided by this exact formula):
//   e = min(floor(E / 3), L - 1), E = max(exponent of y, 0)
//   c = clamp(ceil(((y * 2^-2e - 2^e) - 3.5) * fp32(1/7)), 0, 2^e),   q = 2^e - 1 + c
//   q = y > t0 ? max(q, 1) : 0,  t0 = 4 (signed: half the smallest value) or 0 (unsigned:
//   a positive second moment never becomes 0).
template <int L>
FO_HD uint32_t dynamic_code(float y) {
  const uint32_t by = f32_bits(y);
  const int32_t exp = int32_t(by >> 23) - 127;
  const uint32_t e_raw = (uint32_t(exp < 0 ? 0 : exp) * 11u) >> 5;  // floor(E/3), E <= 24
  const uint32_t e = e_raw > uint32_t(L - 1) ? uint32_t(L - 1) : e_raw;
  const float ny = mul_rn(y, bits_f32((127u - 2u * e) << 23));
  const float p2 = bits_f32((127u + e) << 23);
  float c = ::ceilf(mul_rn(add_rn(add_rn(ny, -p2), -3.5f), 0.142857149f));
  c = c < 0.0f ? 0.0f : c;
  c = c > p2 ? p2 : c;
  const uint32_t q = (1u << e) - 1u + static_cast<uint32_t>(c);
  const float t0 = L == kSignedLevels ? 4.0f : 0.0f;
  return y > t0 ? (q < 1u ? 1u : q) : 0u;
}

// 2^(3L) / absmax for a block whose absmax passed block_absmax() (>= 2^-100: finite).
template <int L>
FO_HD float code_scale(float absmax) {
  return div_rn(static_cast<float>(1u << (3 * L)), absmax);
}

// The stored absmax of a block from the largest magnitude seen (NaN if any element was
// NaN): NaN/inf -> NaN (the block decodes to NaN), below 2^-100 -> 0 (decodes to 0).
FO_HD float block_absmax(float amax) {
  if (!(amax <= 3.4028234663852886e38f)) return bits_f32(0x7fc00000u);
  return amax < kQuantMinAbsmax ? 0.0f : amax;
}

// True when the codes of a block with this stored absmax are computed (else all 0).
FO_HD bool block_has_codes(float absmax) { return absmax >= kQuantMinAbsmax; }

FO_HD int8_t signed_code(float x, float scale) {
  const uint32_t q = dynamic_code<kSignedLevels>(mul_rn(::fabsf(x), scale));
  return static_cast<int8_t>(f32_bits(x) >> 31 ? -int32_t(q) : int32_t(q));
}
FO_HD uint8_t unsigned_code(float x, float scale) {
  return static_cast<uint8_t>(dynamic_code<kUnsignedLevels>(mul_rn(x, scale)));
}
FO_HD float signed_value(int8_t code, float absmax) {
  const int32_t c = code;
  const uint32_t q = uint32_t(c < 0 ? (c == -128 ? 127 : -c) : c);
  const float v = dynamic_value<kSignedLevels>(q);
  return mul_rn(c < 0 ? -v : v, absmax);
}
FO_HD float unsigned_value(uint8_t code, float absmax) {
  return mul_rn(dynamic_value<kUnsignedLevels>(code), absmax);
}

// ---------------------------------------------------------------- lean Adam

struct LeanAdamCoefs {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float neg_step_size;  // -lr / (1 - beta1^t)
  float inv_bc2_sqrt;   // 1 / sqrt(1 - beta2^t)
  float eps;
  float l2;             // Adam's weight decay (added to the gradient), else 0
  float param_decay;    // AdamW's 1 - lr*wd, else 1
};

// base^n by repeated squaring from the low bit of n (the same double products everywhere).
FO_HD double pow_by_squaring(double base, uint32_t n) {
  double result = 1.0;
  while (n != 0) {
    if (n & 1u) result = mul_rn(result, base);
    n >>= 1;
    if (n != 0) base = mul_rn(base, base);
  }
  return result;
}

// Coefficients of one tensor for the step whose count (after the update) is t; double math
// rounded once to fp32.
FO_HD LeanAdamCoefs lean_adam_coefs(double lr, double beta1, double beta2, double eps,
                                    double weight_decay, bool decoupled, uint32_t t) {
  const double bc1 = add_rn(1.0, -pow_by_squaring(beta1, t));
  const double bc2 = add_rn(1.0, -pow_by_squaring(beta2, t));
  LeanAdamCoefs c;
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(add_rn(1.0, -beta1));
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(add_rn(1.0, -beta2));
  c.neg_step_size = static_cast<float>(-(lr / bc1));
  c.inv_bc2_sqrt = static_cast<float>(1.0 / ::sqrt(bc2));
  c.eps = static_cast<float>(eps);
  c.l2 = decoupled ? 0.0f : static_cast<float>(weight_decay);
  c.param_decay = decoupled ? static_cast<float>(add_rn(1.0, -mul_rn(lr, weight_decay))) : 1.0f;
  return c;
}

// One element: p (the param or its master), g (the used gradient), m and v (the decoded
// moments) in fp32; every operation rounded once.
template <bool kL2>
FO_HD void lean_adam_math(float& p, float g, float& m, float& v, const LeanAdamCoefs& c) {
  p = mul_rn(p, c.param_decay);
  if (kL2) g = add_rn(g, mul_rn(c.l2, p));
  m = add_rn(mul_rn(c.beta1, m), mul_rn(c.one_minus_beta1, g));
  v = add_rn(mul_rn(c.beta2, v), mul_rn(c.one_minus_beta2, mul_rn(g, g)));
  const float denom = add_rn(mul_rn(sqrt_rn(v), c.inv_bc2_sqrt), c.eps);
  p = add_rn(p, div_rn(mul_rn(c.neg_step_size, m), denom));
}

}  // namespace fusedopt::lean
