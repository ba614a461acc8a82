// AVX-512 loop of the CPU lean Adam kernel for its most common case: fp32 params, bf16
// moments (lean_dense.h). The same operations as the portable loop of lean_adam.cpp (the
// lean math of math_lean.h, fmix32 random bits, stochastic rounding to bf16), written with
// intrinsics because the compiler vectorises the mixed 16/32-bit loop 32 lanes wide and
// spills; 16 lanes per step here:
//   p, g (fp32), m, v (bf16 -> fp32 by a shift) -> lean math -> p (fp32);
//   r = fmix32(k ^ high);  m = (bits(m) + (r & 0xffff)) >> 16,  v = (bits(v) + (r >> 16)) >> 16
//   (a NaN adds nothing and gets the quiet bit 0x40, as round_bf16_stochastic).
// Traffic: reads p, g (8 bytes) and m, v (4), writes p (4) and m, v (4) per element.
#include "lean_dense.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip -Wmaybe-uninitialized
// under -Wall; nothing here is uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <type_traits>

#include "fusedopt/math_lean.h"
#include "lean_blocks.h"

namespace fusedopt::cpu::lean_dense {

#if defined(__x86_64__) && defined(__GNUC__)
namespace {

using namespace fusedopt::lean;

#define FO_V4 __attribute__((target("arch=x86-64-v4")))

FO_V4 inline __m512i fmix32_v(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(int32_t(0x85EBCA6Bu)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(int32_t(0xC2B2AE35u)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

// round_bf16_stochastic of 16 values, returned in the low half of each 32-bit lane.
FO_V4 inline __m512i round_bf16(__m512 x, __m512i r16) {
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 nan = _mm512_fpclass_ps_mask(x, 0x81);  // quiet or signalling NaN
  const __m512i t = _mm512_mask_add_epi32(u, ~nan, u, r16);
  return _mm512_mask_or_epi32(_mm512_srli_epi32(t, 16), nan, _mm512_srli_epi32(t, 16),
                              _mm512_set1_epi32(0x40));
}

template <bool kL2, bool kTransform>
FO_V4 void loop(float* __restrict param, const float* __restrict grad, uint16_t* __restrict m16,
                uint16_t* __restrict v16, int64_t n, const LeanAdamCoefs& c,
                const GradTransform& gt, uint32_t state_high, uint32_t start) {
  const __m512 b1 = _mm512_set1_ps(c.beta1), omb1 = _mm512_set1_ps(c.one_minus_beta1);
  const __m512 b2 = _mm512_set1_ps(c.beta2), omb2 = _mm512_set1_ps(c.one_minus_beta2);
  const __m512 nss = _mm512_set1_ps(c.neg_step_size), rbc2 = _mm512_set1_ps(c.inv_bc2_sqrt);
  const __m512 eps = _mm512_set1_ps(c.eps), l2 = _mm512_set1_ps(c.l2);
  const __m512 decay = _mm512_set1_ps(c.param_decay);
  const __m512 inv_scale = _mm512_set1_ps(gt.inv_scale), clip = _mm512_set1_ps(gt.clip_coef);
  const __m512 sign = _mm512_set1_ps(gt.sign);
  const __m512i high = _mm512_set1_epi32(int32_t(state_high));
  const __m512i low16 = _mm512_set1_epi32(0xffff);
  __m512i k = _mm512_add_epi32(_mm512_set1_epi32(int32_t(start)),
                               _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                 14, 15));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask =
        n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    __m512 p = _mm512_maskz_loadu_ps(mask, param + i);
    __m512 g = _mm512_maskz_loadu_ps(mask, grad + i);
    if (kTransform) g = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(g, inv_scale), clip), sign);
    __m512 m = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, m16 + i)), 16));
    __m512 v = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, v16 + i)), 16));
    p = _mm512_mul_ps(p, decay);  // 1 for Adam: exact
    if (kL2) g = _mm512_add_ps(g, _mm512_mul_ps(l2, p));
    m = _mm512_add_ps(_mm512_mul_ps(b1, m), _mm512_mul_ps(omb1, g));
    v = _mm512_add_ps(_mm512_mul_ps(b2, v), _mm512_mul_ps(omb2, _mm512_mul_ps(g, g)));
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), rbc2), eps);
    p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(nss, m), denom));
    _mm512_mask_storeu_ps(param + i, mask, p);
    const __m512i r = fmix32_v(_mm512_xor_si512(k, high));
    _mm512_mask_cvtepi32_storeu_epi16(m16 + i, mask, round_bf16(m, _mm512_and_si512(r, low16)));
    _mm512_mask_cvtepi32_storeu_epi16(v16 + i, mask, round_bf16(v, _mm512_srli_epi32(r, 16)));
    k = _mm512_add_epi32(k, _mm512_set1_epi32(16));
  }
}

}  // namespace

bool bf16_moments_fp32_params(float* param, const float* grad, uint16_t* m16, uint16_t* v16,
                              int64_t n, const LeanAdamCoefs& c, const GradTransform& gt,
                              bool l2, bool transform, uint32_t state_high, uint32_t start) {
  if (!lean_blocks::uses_avx512_blocks()) return false;
  const auto run = [&](auto kL2, auto kTransform) {
    loop<decltype(kL2)::value, decltype(kTransform)::value>(param, grad, m16, v16, n, c, gt,
                                                            state_high, start);
  };
  if (l2) {
    if (transform) run(std::true_type{}, std::true_type{}); else run(std::true_type{}, std::false_type{});
  } else {
    if (transform) run(std::false_type{}, std::true_type{}); else run(std::false_type{}, std::false_type{});
  }
  return true;
}
#else
bool bf16_moments_fp32_params(float*, const float*, uint16_t*, uint16_t*, int64_t,
                              const lean::LeanAdamCoefs&, const GradTransform&, bool, bool,
                              uint32_t, uint32_t) {
  return false;
}
#endif

}  // namespace fusedopt::cpu::lean_dense
