// AVX-512 loop of the CPU lean Adam kernel for its most common case: fp32 params, bf16
// moments (lean_dense.h). The same operations as the portable loop of lean_adam.cpp (the
// lean math of math_lean.h, fmix32 random bits, stochastic rounding to bf16), written with
// intrinsics because the compiler vectorises the mixed 16/32-bit loop 32 lanes wide and
// spills; 16 lanes per step here:
//   p, g (fp32), m, v (bf16 -> fp32 by a shift) -> lean math -> p (fp32);
//   r = fmix32(k ^ high);  m = (bits(m) + (r & 0xffff)) >> 16,  v = (bits(v) + (r >> 16)) >> 16
//   (a NaN adds nothing and gets the quiet bit 0x40, as round_bf16_stochastic); the sums are
//   left in the high halves of the lanes and one word permute gathers m's and v's 16 bf16
//   into one register. Whole vectors two at a time with plain loads and stores, the tail
//   masked; the loads of all four streams are prefetched 512 elements ahead.
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

// round_bf16_stochastic of 16 values, left in the high half of each 32-bit lane: u + r16,
// or u | 0x400000 for a NaN (the quiet bit 0x40 of the bf16 bits).
FO_V4 inline __m512i round_bf16_high(__m512 x, __m512i r16) {
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 nan = _mm512_fpclass_ps_mask(x, 0x81);  // quiet or signalling NaN
  return _mm512_mask_or_epi32(_mm512_add_epi32(u, r16), nan, u, _mm512_set1_epi32(0x400000));
}

// The loop's constants, broadcast once.
struct Regs {
  __m512 b1, omb1, b2, omb2, nss, rbc2, eps, l2, decay, inv_scale, clip, sign;
  __m512i high, low16, high_words;
};

// 16 elements from i; kFull: all 16 (plain loads), else the first n - i (masked).
template <bool kL2, bool kTransform, bool kFull>
FO_V4 inline void step16(float* __restrict param, const float* __restrict grad,
                         uint16_t* __restrict m16, uint16_t* __restrict v16, int64_t i,
                         __mmask16 mask, __m512i k, const Regs& regs) {
  __m512 p, g;
  __m512i m_bits, v_bits;
  if (kFull) {
    p = _mm512_loadu_ps(param + i);
    g = _mm512_loadu_ps(grad + i);
    m_bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m16 + i)));
    v_bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v16 + i)));
  } else {
    p = _mm512_maskz_loadu_ps(mask, param + i);
    g = _mm512_maskz_loadu_ps(mask, grad + i);
    m_bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, m16 + i));
    v_bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, v16 + i));
  }
  if (kTransform)
    g = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(g, regs.inv_scale), regs.clip), regs.sign);
  __m512 m = _mm512_castsi512_ps(_mm512_slli_epi32(m_bits, 16));
  __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(v_bits, 16));
  p = _mm512_mul_ps(p, regs.decay);  // 1 for Adam: exact
  if (kL2) g = _mm512_add_ps(g, _mm512_mul_ps(regs.l2, p));
  m = _mm512_add_ps(_mm512_mul_ps(regs.b1, m), _mm512_mul_ps(regs.omb1, g));
  v = _mm512_add_ps(_mm512_mul_ps(regs.b2, v), _mm512_mul_ps(regs.omb2, _mm512_mul_ps(g, g)));
  const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), regs.rbc2), regs.eps);
  p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(regs.nss, m), denom));
  const __m512i r = fmix32_v(_mm512_xor_si512(k, regs.high));
  // the high halves of m's then v's lanes: m's 16 bf16 in the low 256 bits, v's above
  const __m512i mv =
      _mm512_permutex2var_epi16(round_bf16_high(m, _mm512_and_si512(r, regs.low16)),
                                regs.high_words, round_bf16_high(v, _mm512_srli_epi32(r, 16)));
  if (kFull) {
    _mm512_storeu_ps(param + i, p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(m16 + i), _mm512_castsi512_si256(mv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v16 + i), _mm512_extracti64x4_epi64(mv, 1));
  } else {
    _mm512_mask_storeu_ps(param + i, mask, p);
    _mm256_mask_storeu_epi16(m16 + i, mask, _mm512_castsi512_si256(mv));
    _mm256_mask_storeu_epi16(v16 + i, mask, _mm512_extracti64x4_epi64(mv, 1));
  }
}

// Software prefetch 512 elements ahead of the loop (2 KiB of p and g, 1 KiB of m and v):
// the hardware prefetchers alone leave the loads of the seven streams waiting on memory.
constexpr int64_t kPrefetchAhead = 512;

// Into L1; a prefetch past the end of an array is harmless (it never faults).
FO_V4 inline __attribute__((always_inline)) void prefetch(const void* address) {
  _mm_prefetch(static_cast<const char*>(address), _MM_HINT_T0);
}

template <bool kL2, bool kTransform>
FO_V4 void loop(float* __restrict param, const float* __restrict grad, uint16_t* __restrict m16,
                uint16_t* __restrict v16, int64_t n, const LeanAdamCoefs& c,
                const GradTransform& gt, uint32_t state_high, uint32_t start) {
  Regs r;
  r.b1 = _mm512_set1_ps(c.beta1), r.omb1 = _mm512_set1_ps(c.one_minus_beta1);
  r.b2 = _mm512_set1_ps(c.beta2), r.omb2 = _mm512_set1_ps(c.one_minus_beta2);
  r.nss = _mm512_set1_ps(c.neg_step_size), r.rbc2 = _mm512_set1_ps(c.inv_bc2_sqrt);
  r.eps = _mm512_set1_ps(c.eps), r.l2 = _mm512_set1_ps(c.l2);
  r.decay = _mm512_set1_ps(c.param_decay);
  r.inv_scale = _mm512_set1_ps(gt.inv_scale), r.clip = _mm512_set1_ps(gt.clip_coef);
  r.sign = _mm512_set1_ps(gt.sign);
  r.high = _mm512_set1_epi32(int32_t(state_high));
  r.low16 = _mm512_set1_epi32(0xffff);
  r.high_words = _mm512_setr_epi32(0x30001, 0x70005, 0xb0009, 0xf000d, 0x130011, 0x170015,
                                   0x1b0019, 0x1f001d, 0x230021, 0x270025, 0x2b0029, 0x2f002d,
                                   0x330031, 0x370035, 0x3b0039, 0x3f003d);
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512i k = _mm512_add_epi32(_mm512_set1_epi32(int32_t(start)),
                               _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                 14, 15));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch(param + i + kPrefetchAhead);
    prefetch(param + i + kPrefetchAhead + 16);
    prefetch(grad + i + kPrefetchAhead);
    prefetch(grad + i + kPrefetchAhead + 16);
    prefetch(m16 + i + kPrefetchAhead);
    prefetch(v16 + i + kPrefetchAhead);
    step16<kL2, kTransform, true>(param, grad, m16, v16, i, 0xffff, k, r);
    k = _mm512_add_epi32(k, sixteen);
    step16<kL2, kTransform, true>(param, grad, m16, v16, i + 16, 0xffff, k, r);
    k = _mm512_add_epi32(k, sixteen);
  }
  for (; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    step16<kL2, kTransform, false>(param, grad, m16, v16, i, mask, k, r);
    k = _mm512_add_epi32(k, sixteen);
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
