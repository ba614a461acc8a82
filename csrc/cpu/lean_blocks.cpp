// The 8-bit decode / encode passes of the CPU lean Adam kernel (lean_blocks.h): the portable
// loops, the AVX-512 loops and the choice between them.
//
// AVX-512 decode of a magnitude code q (0..255; the signed map decodes |code|):
//   value(q) = (7q - 6*2^e + 7) * 2^(2e-3L) = q * A[e] + B[e]  with A[e] = 7 * 2^(2e-3L),
//   B[e] = (7 - 6*2^e) * 2^(2e-3L): both products and the sum are exact (|7q| < 2^11), so
//   this is the value of math_lean.h bit for bit. The table index is
//   max(exponent field of float(q) - 126, 0) (0 for q = 0, e + 1 otherwise), one vpermps
//   per table; the signed map's index 8 (|code| = 128) decodes to 1.0, as |code| 127.
// AVX-512 encode of y = |x| * 2^(3L) / absmax: 2^-2e and 2^e looked up from the exponent
// of y (two 32-entry vpermt2ps), then the operations of dynamic_code.
// Traffic: the block's codes and fp32 moments, all in L1.
#include "lean_blocks.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip -Wmaybe-uninitialized
// under -Wall; nothing here is uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <atomic>
#include <cmath>

#include "fusedopt/math_lean.h"
#include "multi_tensor_loop.h"

namespace fusedopt::cpu::lean_blocks {
namespace {

using namespace fusedopt::lean;

std::atomic<bool> g_portable{false};

// ---------------------------------------------------------------- portable passes

FO_CPU_CLONES void decode_portable(const int8_t* __restrict m_codes,
                                   const uint8_t* __restrict v_codes, float m_absmax,
                                   float v_absmax, float* __restrict m, float* __restrict v,
                                   int n) {
  alignas(64) int32_t mq[kQuantBlock], vq[kQuantBlock];
  for (int j = 0; j < n; ++j) mq[j] = m_codes[j];
  for (int j = 0; j < n; ++j) vq[j] = v_codes[j];
  for (int j = 0; j < n; ++j) m[j] = signed_value(int8_t(mq[j]), m_absmax);
  for (int j = 0; j < n; ++j) v[j] = unsigned_value(uint8_t(vq[j]), v_absmax);
}

FO_CPU_CLONES void encode_portable(const float* __restrict m, const float* __restrict v,
                                   float m_absmax, float v_absmax, int8_t* __restrict m_codes,
                                   uint8_t* __restrict v_codes, int n) {
  alignas(64) int32_t mq[kQuantBlock], vq[kQuantBlock];
  const bool m_ok = block_has_codes(m_absmax), v_ok = block_has_codes(v_absmax);
  const float ms = m_ok ? code_scale<kSignedLevels>(m_absmax) : 0.0f;
  const float vs = v_ok ? code_scale<kUnsignedLevels>(v_absmax) : 0.0f;
  for (int j = 0; j < n; ++j) mq[j] = m_ok ? signed_code(m[j], ms) : 0;
  for (int j = 0; j < n; ++j) vq[j] = v_ok ? unsigned_code(v[j], vs) : 0;
  for (int j = 0; j < n; ++j) m_codes[j] = static_cast<int8_t>(mq[j]);
  for (int j = 0; j < n; ++j) v_codes[j] = static_cast<uint8_t>(vq[j]);
}

// ---------------------------------------------------------------- AVX-512 passes

#if defined(__x86_64__) && defined(__GNUC__)
#define FO_HAVE_AVX512_BLOCKS 1
#define FO_V4 __attribute__((target("arch=x86-64-v4")))

// The decode tables of an L-level map: index 0 (q = 0) and e + 1.
template <int L>
struct DecodeTables {
  alignas(64) float a[16] = {};
  alignas(64) float b[16] = {};
  DecodeTables() {
    for (int e = 0; e < L; ++e) {
      const double scale = std::ldexp(1.0, 2 * e - 3 * L);
      a[e + 1] = static_cast<float>(7.0 * scale);
      b[e + 1] = static_cast<float>((7.0 - 6.0 * std::ldexp(1.0, e)) * scale);
    }
    if (L == kSignedLevels) b[L + 1] = 1.0f;  // |code| = 128 decodes as 127
  }
};

// 2^-2e and 2^e by the exponent E of y (index E - 127, clamped below at 0):
// e = min(floor(E / 3), L - 1).
template <int L>
struct EncodeTables {
  alignas(64) float inv4e[32] = {};
  alignas(64) float p2[32] = {};
  EncodeTables() {
    for (int i = 0; i < 32; ++i) {
      const int e = i / 3 < L - 1 ? i / 3 : L - 1;
      inv4e[i] = static_cast<float>(std::ldexp(1.0, -2 * e));
      p2[i] = static_cast<float>(std::ldexp(1.0, e));
    }
  }
};

const DecodeTables<kSignedLevels> kDecodeSigned;
const DecodeTables<kUnsignedLevels> kDecodeUnsigned;
const EncodeTables<kSignedLevels> kEncodeSigned;
const EncodeTables<kUnsignedLevels> kEncodeUnsigned;

FO_V4 inline __mmask16 tail_mask(int remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1u);
}

// The magnitude value of 16 codes (non-negative int32), exact (see the file comment).
FO_V4 inline __m512 magnitude(__m512i q, __m512 a_table, __m512 b_table) {
  const __m512 qf = _mm512_cvtepi32_ps(q);
  const __m512i exp = _mm512_srli_epi32(_mm512_castps_si512(qf), 23);
  const __m512i idx = _mm512_max_epi32(_mm512_sub_epi32(exp, _mm512_set1_epi32(126)),
                                       _mm512_setzero_si512());
  return _mm512_add_ps(_mm512_mul_ps(qf, _mm512_permutexvar_ps(idx, a_table)),
                       _mm512_permutexvar_ps(idx, b_table));
}

FO_V4 void decode_avx512(const int8_t* m_codes, const uint8_t* v_codes, float m_absmax,
                         float v_absmax, float* m, float* v, int n) {
  const __m512 ma = _mm512_load_ps(kDecodeSigned.a), mb = _mm512_load_ps(kDecodeSigned.b);
  const __m512 va = _mm512_load_ps(kDecodeUnsigned.a), vb = _mm512_load_ps(kDecodeUnsigned.b);
  const __m512 m_scale = _mm512_set1_ps(m_absmax), v_scale = _mm512_set1_ps(v_absmax);
  const __m512i sign_bit = _mm512_set1_epi32(int32_t(0x80000000u));
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512i c = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, m_codes + j));
    const __m512 mag = magnitude(_mm512_abs_epi32(c), ma, mb);
    const __m512 signed_mag = _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(mag), _mm512_and_si512(c, sign_bit)));
    _mm512_mask_storeu_ps(m + j, k, _mm512_mul_ps(signed_mag, m_scale));
    const __m512i u = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, v_codes + j));
    _mm512_mask_storeu_ps(v + j, k, _mm512_mul_ps(magnitude(u, va, vb), v_scale));
  }
}

// dynamic_code of 16 values y >= 0 (or -0), with the tables of its map; t0 as in math_lean.h.
FO_V4 inline __m512i codes_of(__m512 y, __m512 inv4e_lo, __m512 inv4e_hi, __m512 p2_lo,
                              __m512 p2_hi, float t0) {
  const __m512i exp = _mm512_srli_epi32(_mm512_castps_si512(y), 23);
  const __m512i idx = _mm512_sub_epi32(_mm512_max_epi32(exp, _mm512_set1_epi32(127)),
                                       _mm512_set1_epi32(127));
  const __m512 inv4e = _mm512_permutex2var_ps(inv4e_lo, idx, inv4e_hi);
  const __m512 p2 = _mm512_permutex2var_ps(p2_lo, idx, p2_hi);
  const __m512 d = _mm512_sub_ps(_mm512_sub_ps(_mm512_mul_ps(y, inv4e), p2),
                                 _mm512_set1_ps(3.5f));
  __m512 c = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(0.142857149f)),
                                  _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  c = _mm512_min_ps(_mm512_max_ps(c, _mm512_setzero_ps()), p2);
  const __m512i q = _mm512_cvttps_epi32(_mm512_add_ps(c, _mm512_sub_ps(p2, _mm512_set1_ps(1.0f))));
  const __mmask16 above = _mm512_cmp_ps_mask(y, _mm512_set1_ps(t0), _CMP_GT_OQ);
  return _mm512_maskz_max_epi32(above, q, _mm512_set1_epi32(1));
}

FO_V4 void encode_avx512(const float* m, const float* v, float m_absmax, float v_absmax,
                         int8_t* m_codes, uint8_t* v_codes, int n) {
  const bool m_ok = block_has_codes(m_absmax), v_ok = block_has_codes(v_absmax);
  const __m512 ms = _mm512_set1_ps(m_ok ? code_scale<kSignedLevels>(m_absmax) : 0.0f);
  const __m512 vs = _mm512_set1_ps(v_ok ? code_scale<kUnsignedLevels>(v_absmax) : 0.0f);
  const __m512 s_lo = _mm512_load_ps(kEncodeSigned.inv4e), s_hi = _mm512_load_ps(kEncodeSigned.inv4e + 16);
  const __m512 sp_lo = _mm512_load_ps(kEncodeSigned.p2), sp_hi = _mm512_load_ps(kEncodeSigned.p2 + 16);
  const __m512 u_lo = _mm512_load_ps(kEncodeUnsigned.inv4e), u_hi = _mm512_load_ps(kEncodeUnsigned.inv4e + 16);
  const __m512 up_lo = _mm512_load_ps(kEncodeUnsigned.p2), up_hi = _mm512_load_ps(kEncodeUnsigned.p2 + 16);
  const __m512i magnitude_bits = _mm512_set1_epi32(0x7fffffff);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 x = _mm512_maskz_loadu_ps(k, m + j);
    __m512i q = _mm512_setzero_si512();
    if (m_ok) {
      const __m512 ax = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), magnitude_bits));
      q = codes_of(_mm512_mul_ps(ax, ms), s_lo, s_hi, sp_lo, sp_hi, 4.0f);
      q = _mm512_mask_sub_epi32(q, _mm512_movepi32_mask(_mm512_castps_si512(x)),
                                _mm512_setzero_si512(), q);
    }
    _mm512_mask_cvtepi32_storeu_epi8(m_codes + j, k, q);
    __m512i w = _mm512_setzero_si512();
    if (v_ok) w = codes_of(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + j), vs), u_lo, u_hi, up_lo,
                           up_hi, 0.0f);
    _mm512_mask_cvtepi32_storeu_epi8(v_codes + j, k, w);
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return has;
}
#endif

}  // namespace

bool uses_avx512_blocks() {
#ifdef FO_HAVE_AVX512_BLOCKS
  return cpu_has_avx512() && !g_portable.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

void set_portable_blocks(bool portable) { g_portable.store(portable); }

void decode_block(const int8_t* m_codes, const uint8_t* v_codes, float m_absmax, float v_absmax,
                  float* m, float* v, int n) {
#ifdef FO_HAVE_AVX512_BLOCKS
  if (uses_avx512_blocks()) return decode_avx512(m_codes, v_codes, m_absmax, v_absmax, m, v, n);
#endif
  decode_portable(m_codes, v_codes, m_absmax, v_absmax, m, v, n);
}

void encode_block(const float* m, const float* v, float m_absmax, float v_absmax,
                  int8_t* m_codes, uint8_t* v_codes, int n) {
#ifdef FO_HAVE_AVX512_BLOCKS
  if (uses_avx512_blocks()) return encode_avx512(m, v, m_absmax, v_absmax, m_codes, v_codes, n);
#endif
  encode_portable(m, v, m_absmax, v_absmax, m_codes, v_codes, n);
}

}  // namespace fusedopt::cpu::lean_blocks
