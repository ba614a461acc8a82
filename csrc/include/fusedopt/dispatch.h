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
  // IEEE binary16 -> binary32, exact (normals, subnormals, inf, NaN).
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    const float mag = float(man) * 5.9604644775390625e-8f;  // man * 2^-24
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16_t from_float<bf16_t>(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}
template <> inline fp16_t from_float<fp16_t>(float x) {
  // binary32 -> binary16, round to nearest even, overflow to inf.
  const uint32_t u = float_to_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520
  if (abs < 0x38800000u) {                                           // subnormal or zero
    const float mag = bits_to_float(abs) * 16777216.0f;              // * 2^24, exact
    uint32_t q = uint32_t(mag);
    const float rem = mag - float(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return fp16_t{uint16_t(sign | q)};
  }
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
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
