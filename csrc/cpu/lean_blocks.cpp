// The 8-bit decode / encode passes of the CPU lean Adam kernel (lean_blocks.h): the portable
// loops, the AVX-512 loops and the choice between them.
//
// AVX-512 decode of a magnitude code q (0..255; the signed map decodes |code|):
//   value(q) = (7q - 6*2^e + 7) * 2^(2e-3L) = q * A[e] + B[e]  with A[e] = 7 * 2^(2e-3L),
//   B[e] = (7 - 6*2^e) * 2^(2e-3L): both products and the sum are exact (|7q| < 2^11), so
//   this is the value of math_lean.h bit for bit. The table index is the low 4 bits of
//   lzcnt(q) (0 for q = 0, 15 - e otherwise), one vpermps per table; the signed map's
//   index 8 (|code| = 128, e = 7) decodes to 1.0, as |code| 127.
// AVX-512 encode of y = |x| * 2^(3L) / absmax: 2^-2e and 2^e looked up from the exponent
// of y (two 32-entry vpermt2ps), then the operations of dynamic_code.
// Traffic: the block's codes and fp32 moments, all in L1; update_block_fp32 also reads p, g
// (8 bytes) and writes p (4) per element, the loads of p, g and the codes prefetched 512
// elements ahead (a full block's passes are compiled for n = 256: no masks).
#include "lean_blocks.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip -Wmaybe-uninitialized
// under -Wall; nothing here is uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
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
#define FO_ALWAYS_INLINE inline __attribute__((always_inline))

// The decode tables of an L-level map: index 0 (q = 0) and 15 - e.
template <int L>
struct DecodeTables {
  alignas(64) float a[16] = {};
  alignas(64) float b[16] = {};
  DecodeTables() {
    for (int e = 0; e < L; ++e) {
      const double scale = std::ldexp(1.0, 2 * e - 3 * L);
      a[15 - e] = static_cast<float>(7.0 * scale);
      b[15 - e] = static_cast<float>((7.0 - 6.0 * std::ldexp(1.0, e)) * scale);
    }
    if (L == kSignedLevels) b[15 - L] = 1.0f;  // |code| = 128 decodes as 127
  }
};

// 2^-2e, 2^e + 3.5 and (int32) 2^e - 1 by the exponent E of y (index E - 127, clamped
// below at 0): e = min(floor(E / 3), L - 1).
struct EncodeTables {
  alignas(64) float inv4e[32] = {};
  alignas(64) float p2_plus[32] = {};
  alignas(64) int32_t p2_minus[32] = {};
  float t0;
  explicit EncodeTables(int levels) : t0(levels == kSignedLevels ? 4.0f : 0.0f) {
    for (int i = 0; i < 32; ++i) {
      const int e = i / 3 < levels - 1 ? i / 3 : levels - 1;
      inv4e[i] = static_cast<float>(std::ldexp(1.0, -2 * e));
      p2_plus[i] = static_cast<float>(std::ldexp(1.0, e) + 3.5);
      p2_minus[i] = (1 << e) - 1;
    }
  }
};

const DecodeTables<kSignedLevels> kDecodeSigned;
const DecodeTables<kUnsignedLevels> kDecodeUnsigned;
const EncodeTables kEncodeSigned(kSignedLevels);
const EncodeTables kEncodeUnsigned(kUnsignedLevels);

// Software prefetch 512 elements (two blocks) ahead of the update pass: the hardware
// prefetchers alone leave its loads of p, g and the codes waiting on memory. A prefetch past
// the end of an array is harmless (it never faults).
constexpr int kPrefetchAhead = 512;

FO_V4 FO_ALWAYS_INLINE void prefetch(const void* address) {
  _mm_prefetch(static_cast<const char*>(address), _MM_HINT_T0);
}

FO_V4 inline __mmask16 tail_mask(int remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1u);
}

// The magnitude value of 16 codes (non-negative int32), exact (see the file comment).
FO_V4 inline __m512 magnitude(__m512i q, __m512 a_table, __m512 b_table) {
  const __m512 qf = _mm512_cvtepi32_ps(q);
  const __m512i idx = _mm512_lzcnt_epi32(q);  // the permutes use its low 4 bits
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

// dynamic_code of 16 values y >= 0 (or -0) of one map, the tables held in registers.
// Three shortcuts that give the same codes: d = y*2^-2e - (2^e + 3.5) equals
// (y*2^-2e - 2^e) - 3.5 (both exact, except for y < 1 where either is within an ulp of -4.5
// and c = 0 anyway); ceil(d/7) is never below -0 (d >= -4.5) nor above 2^e (see
// lean_states.md), so the clamp is left out; the ceiling is taken by the conversion to int32
// (rounding up), and q = c + (2^e - 1) added as integers (in fp32 the sum is exact too).
struct EncodeRegs {
  __m512 scale_lo, scale_hi, offset_lo, offset_hi;
  __m512i base_lo, base_hi;
  __m512 t0;
};

FO_V4 inline EncodeRegs encode_regs(const EncodeTables& t) {
  return EncodeRegs{_mm512_load_ps(t.inv4e), _mm512_load_ps(t.inv4e + 16),
                    _mm512_load_ps(t.p2_plus), _mm512_load_ps(t.p2_plus + 16),
                    _mm512_load_si512(t.p2_minus), _mm512_load_si512(t.p2_minus + 16),
                    _mm512_set1_ps(t.t0)};
}

FO_V4 inline __m512i codes_of(__m512 y, const EncodeRegs& r) {
  const __m512i exp = _mm512_srli_epi32(_mm512_castps_si512(y), 23);
  const __m512i idx = _mm512_sub_epi32(_mm512_max_epi32(exp, _mm512_set1_epi32(127)),
                                       _mm512_set1_epi32(127));
  const __m512 d = _mm512_sub_ps(_mm512_mul_ps(y, _mm512_permutex2var_ps(r.scale_lo, idx, r.scale_hi)),
                                 _mm512_permutex2var_ps(r.offset_lo, idx, r.offset_hi));
  const __m512i c = _mm512_cvt_roundps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(0.142857149f)),
                                              _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  const __m512i q = _mm512_add_epi32(c, _mm512_permutex2var_epi32(r.base_lo, idx, r.base_hi));
  const __mmask16 above = _mm512_cmp_ps_mask(y, r.t0, _CMP_GT_OQ);
  return _mm512_maskz_max_epi32(above, q, _mm512_set1_epi32(1));
}

// The codes of one moment of a block (signed: sign + magnitude of |x|; unsigned: of x).
template <bool kSigned, typename C>
FO_V4 FO_ALWAYS_INLINE void encode_one(const float* x, float absmax, C* codes, int n) {
  if (!block_has_codes(absmax)) {
    for (int j = 0; j < n; ++j) codes[j] = 0;
    return;
  }
  constexpr int L = kSigned ? kSignedLevels : kUnsignedLevels;
  const EncodeRegs regs = encode_regs(kSigned ? kEncodeSigned : kEncodeUnsigned);
  const __m512 scale = _mm512_set1_ps(code_scale<L>(absmax));
  const __m512i magnitude_bits = _mm512_set1_epi32(0x7fffffff);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + j);
    __m512i q;
    if (kSigned) {
      const __m512i bits = _mm512_castps_si512(v);
      q = codes_of(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(bits, magnitude_bits)),
                                 scale), regs);
      q = _mm512_mask_sub_epi32(q, _mm512_movepi32_mask(bits), _mm512_setzero_si512(), q);
    } else {
      q = codes_of(_mm512_mul_ps(v, scale), regs);
    }
    _mm512_mask_cvtepi32_storeu_epi8(codes + j, k, q);
  }
}

FO_V4 void encode_avx512(const float* m, const float* v, float m_absmax, float v_absmax,
                         int8_t* m_codes, uint8_t* v_codes, int n) {
  encode_one<true>(m, m_absmax, m_codes, n);
  encode_one<false>(v, v_absmax, v_codes, n);
}

// One 8-bit block with fp32 params: decode, the lean update (math_lean.h's operations),
// the new absmax (maximum of the magnitude bits, kept in registers), then the encode of
// each moment. Inlined into update_fp32_avx512 twice: for a full block (n = 256, the masks
// fold away) and for a chunk's last, partial one.
template <bool kL2, bool kTransform>
FO_V4 FO_ALWAYS_INLINE void update_body(float* param, const float* grad, int8_t* m_codes,
                                        uint8_t* v_codes, float* m_absmax, float* v_absmax,
                                        int n, const LeanAdamCoefs& c, const GradTransform& gt) {
  alignas(64) float m_new[kQuantBlock], v_new[kQuantBlock];
  const __m512 ma = _mm512_load_ps(kDecodeSigned.a), mb = _mm512_load_ps(kDecodeSigned.b);
  const __m512 va = _mm512_load_ps(kDecodeUnsigned.a), vb = _mm512_load_ps(kDecodeUnsigned.b);
  const __m512 m_scale = _mm512_set1_ps(*m_absmax), v_scale = _mm512_set1_ps(*v_absmax);
  const __m512i sign_bit = _mm512_set1_epi32(int32_t(0x80000000u));
  const __m512i magnitude_bits = _mm512_set1_epi32(0x7fffffff);
  const __m512 b1 = _mm512_set1_ps(c.beta1), omb1 = _mm512_set1_ps(c.one_minus_beta1);
  const __m512 b2 = _mm512_set1_ps(c.beta2), omb2 = _mm512_set1_ps(c.one_minus_beta2);
  const __m512 nss = _mm512_set1_ps(c.neg_step_size), rbc2 = _mm512_set1_ps(c.inv_bc2_sqrt);
  const __m512 eps = _mm512_set1_ps(c.eps), l2 = _mm512_set1_ps(c.l2);
  const __m512 decay = _mm512_set1_ps(c.param_decay);
  __m512i m_max = _mm512_setzero_si512(), v_max = _mm512_setzero_si512();
  for (int j = 0; j < n; j += 16) {
    prefetch(param + j + kPrefetchAhead);
    prefetch(grad + j + kPrefetchAhead);
    if ((j & 63) == 0) {  // one line of each code stream per 64 elements
      prefetch(m_codes + j + kPrefetchAhead);
      prefetch(v_codes + j + kPrefetchAhead);
    }
    const __mmask16 k = tail_mask(n - j);
    const __m512i mc = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, m_codes + j));
    const __m512 mag = magnitude(_mm512_abs_epi32(mc), ma, mb);
    __m512 m = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_xor_si512(
                                 _mm512_castps_si512(mag), _mm512_and_si512(mc, sign_bit))),
                             m_scale);
    __m512 v = _mm512_mul_ps(
        magnitude(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, v_codes + j)), va, vb), v_scale);
    __m512 p = _mm512_maskz_loadu_ps(k, param + j);
    __m512 g = _mm512_maskz_loadu_ps(k, grad + j);
    if (kTransform)
      g = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(g, _mm512_set1_ps(gt.inv_scale)),
                                      _mm512_set1_ps(gt.clip_coef)),
                        _mm512_set1_ps(gt.sign));
    p = _mm512_mul_ps(p, decay);
    if (kL2) g = _mm512_add_ps(g, _mm512_mul_ps(l2, p));
    m = _mm512_add_ps(_mm512_mul_ps(b1, m), _mm512_mul_ps(omb1, g));
    v = _mm512_add_ps(_mm512_mul_ps(b2, v), _mm512_mul_ps(omb2, _mm512_mul_ps(g, g)));
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), rbc2), eps);
    p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(nss, m), denom));
    _mm512_mask_storeu_ps(param + j, k, p);
    _mm512_store_ps(m_new + j, m);
    _mm512_store_ps(v_new + j, v);
    m_max = _mm512_mask_max_epu32(m_max, k, m_max,
                                  _mm512_and_si512(_mm512_castps_si512(m), magnitude_bits));
    v_max = _mm512_mask_max_epu32(v_max, k, v_max,
                                  _mm512_and_si512(_mm512_castps_si512(v), magnitude_bits));
  }
  const float m_stored = block_absmax(bits_f32(uint32_t(_mm512_reduce_max_epu32(m_max))));
  const float v_stored = block_absmax(bits_f32(uint32_t(_mm512_reduce_max_epu32(v_max))));
  *m_absmax = m_stored;
  *v_absmax = v_stored;
  encode_one<true>(m_new, m_stored, m_codes, n);
  encode_one<false>(v_new, v_stored, v_codes, n);
}

template <bool kL2, bool kTransform>
FO_V4 void update_fp32_avx512(float* param, const float* grad, int8_t* m_codes,
                              uint8_t* v_codes, float* m_absmax, float* v_absmax, int n,
                              const LeanAdamCoefs& c, const GradTransform& gt) {
  if (n == kQuantBlock)
    update_body<kL2, kTransform>(param, grad, m_codes, v_codes, m_absmax, v_absmax, kQuantBlock,
                                 c, gt);
  else
    update_body<kL2, kTransform>(param, grad, m_codes, v_codes, m_absmax, v_absmax, n, c, gt);
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

bool update_block_fp32(float* param, const float* grad, int8_t* m_codes, uint8_t* v_codes,
                       float* m_absmax, float* v_absmax, int n, const LeanAdamCoefs& c,
                       const GradTransform& gt, bool l2, bool transform) {
#ifdef FO_HAVE_AVX512_BLOCKS
  if (!uses_avx512_blocks()) return false;
  if (l2) {
    if (transform)
      update_fp32_avx512<true, true>(param, grad, m_codes, v_codes, m_absmax, v_absmax, n, c, gt);
    else
      update_fp32_avx512<true, false>(param, grad, m_codes, v_codes, m_absmax, v_absmax, n, c, gt);
  } else {
    if (transform)
      update_fp32_avx512<false, true>(param, grad, m_codes, v_codes, m_absmax, v_absmax, n, c, gt);
    else
      update_fp32_avx512<false, false>(param, grad, m_codes, v_codes, m_absmax, v_absmax, n, c, gt);
  }
  return true;
#else
  return false;
#endif
}

void encode_block(const float* m, const float* v, float m_absmax, float v_absmax,
                  int8_t* m_codes, uint8_t* v_codes, int n) {
#ifdef FO_HAVE_AVX512_BLOCKS
  if (uses_avx512_blocks()) return encode_avx512(m, v, m_absmax, v_absmax, m_codes, v_codes, n);
#endif
  encode_portable(m, v, m_absmax, v_absmax, m_codes, v_codes, n);
}

}  // namespace fusedopt::cpu::lean_blocks
