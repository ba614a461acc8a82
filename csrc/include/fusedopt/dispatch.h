// Storage dtypes and compile-time dispatch (torch-free).
//
// DType mirrors the codes the Python launchers pass (fusedopt/backends/_ptr.py):
// 0 = float32, 1 = bfloat16, 2 = float16. Low-precision values are stored as 16-bit
// words and converted to/from fp32 by to_float / from_float; all math is fp32.
#pragma once
#include <cstdint>
#include <cstring>

#include "fusedopt/math.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fusedopt {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// 16-bit storage types. Under nvcc they are CUDA's own, so loads compile to native
// conversions; under g++ they are plain words with bit-exact round-to-nearest-even.
#if defined(__CUDACC__)
using bf16_t = __nv_bfloat16;
using fp16_t = __half;
FO_HD float to_float(float x) { return x; }
FO_HD float to_float(bf16_t x) { return __bfloat162float(x); }
FO_HD float to_float(fp16_t x) { return __half2float(x); }
template <typename T> FO_HD T from_float(float x);
template <> FO_HD float from_float<float>(float x) { return x; }
template <> FO_HD bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }
template <> FO_HD fp16_t from_float<fp16_t>(float x) { return __float2half_rn(x); }
#else
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(fp16_t x) {
  // IEEE binary16 -> binary32, exact (normals, subnormals, inf, NaN). Branch-free (masks,
  // no float subnormal operands) so that loops over it vectorise.
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t em = x.bits & 0x7fffu;                         // exponent and mantissa
  const uint32_t normal = (em << 13) + (112u << 23);             // rebias 15 -> 127
  const uint32_t inf_nan = 0x7f800000u | (em << 13);
  const uint32_t subnormal =
      float_to_bits(float(int32_t(em)) * 5.9604644775390625e-8f);  // em * 2^-24
  const uint32_t is_sub = 0u - uint32_t(em < 0x400u);            // all ones: subnormal or zero
  const uint32_t is_top = 0u - uint32_t(em >= 0x7c00u);          // all ones: inf or NaN
  const uint32_t mag = (subnormal & is_sub) | (inf_nan & is_top) | (normal & ~(is_sub | is_top));
  return bits_to_float(sign | mag);
}

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16_t from_float<bf16_t>(float x) {
  // Round to nearest even; NaN -> quiet NaN. Branch-free (a mask) so that loops vectorise.
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const uint32_t is_nan = 0u - uint32_t((u & 0x7fffffffu) > 0x7f800000u);
  return bf16_t{uint16_t((quiet_nan & is_nan) | (rounded & ~is_nan))};
}
template <> inline fp16_t from_float<fp16_t>(float x) {
  // binary32 -> binary16, round to nearest even, overflow to inf, NaN -> quiet NaN.
  // Branch-free (masks) so that loops over it vectorise.
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal halves: rebias, round the 13 dropped bits to nearest even (a carry may bump
  // the exponent, which is right)
  const uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // below 2^-14: adding 0.5 rounds |x| to a multiple of 2^-24 (the ulp of 0.5), to nearest
  // even in the default rounding mode
  const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t is_sub = 0u - uint32_t(a < 0x38800000u);
  const uint32_t is_big = 0u - uint32_t(a >= 0x477ff000u);  // rounds to >= 65520: inf
  const uint32_t is_nan = 0u - uint32_t(a > 0x7f800000u);
  const uint32_t finite = (subnormal & is_sub) | (normal & ~is_sub);
  const uint32_t h = (0x7e00u & is_nan) | (0x7c00u & is_big & ~is_nan) | (finite & ~is_big);
  return fp16_t{uint16_t(sign | h)};
}
#endif

}  // namespace fusedopt

// DTYPE_SWITCH(code, T, ...): runs the body with `using T = float | bf16_t | fp16_t`.
#define FO_DTYPE_SWITCH(CODE, T, ...)                                  \
  [&] {                                                                \
    switch (static_cast<::fusedopt::DType>(CODE)) {                    \
      case ::fusedopt::DType::kBFloat16: {                             \
        using T = ::fusedopt::bf16_t;                                  \
        return __VA_ARGS__();                                          \
      }                                                                \
      case ::fusedopt::DType::kFloat16: {                              \
        using T = ::fusedopt::fp16_t;                                  \
        return __VA_ARGS__();                                          \
      }                                                                \
      default: {                                                       \
        using T = float;                                               \
        return __VA_ARGS__();                                          \
      }                                                                \
    }                                                                  \
  }()

// BOOL_SWITCH(cond, NAME, ...): runs the body with `constexpr bool NAME = cond`.
#define FO_BOOL_SWITCH(COND, NAME, ...)        \
  [&] {                                        \
    if (COND) {                                \
      constexpr bool NAME = true;              \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr bool NAME = false;             \
      return __VA_ARGS__();                    \
    }                                          \
  }()
