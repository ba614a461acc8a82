// Element math of the losses, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// Everything is fp32 and FO_HD (FO_LOSS_HD). The transcendental functions come in two forms:
//   * under nvcc device code the C functions ::expf, ::logf, ::expm1f, ::tanhf, ::log1pf;
//   * on the host branch-free polynomial versions (exp_poly, log_poly, ...), written with
//     selects and bit casts only, so that g++ vectorises the loops that call them (glibc's
//     scalar expf does not vectorise without -ffast-math). Measured error over every
//     97th float: exp 1.2 ulp (0 below 2^-125), log 1, expm1 2.1, log1p 2.5, tanh 3 (the CUDA C functions: 1-2).
// fexp / flog / fexpm1 / flog1p / ftanh pick the form; the helpers below use only those.
// The polynomials use no FMA (the build has -ffp-contract=off), so every ISA clone of a
// CPU kernel rounds alike: the same bits on any x86-64 machine.
// Selects are written "compute both, then pick" (no arithmetic inside a ?: arm), so that
// g++ turns them into blends instead of masked, exception-preserving code.
//
// Cross-entropy, per row (x = softcapped logits, w = class weights or 1, eps = smoothing):
//   online log-sum-exp: per lane a running max m and d = sum exp(x - m), one exp per
//   element (lse_fold); lanes merge at the end of the row (lse_merge).
//   class target y: ce = (1-eps) w_y (lse - x_y) + (eps/C) sum_j w_j (lse - x_j)
//   soft target q:  ce = sum_j r_j (lse - x_j),  r_j = w_j ((1-eps) q_j + eps/C)
//   loss = s_ce ce + s_z c lse^2,  dloss/dx_j = p_j A - t_j  (ClassRowCoeffs)
//   Every such sum is taken relative to the row max M, never as lse sum w - sum w x
//   (which cancels for large logits: a row of equal logits 1e30 would lose every digit):
//   lse - x_j = log S + (M - x_j), so ce is built from log S times the summed weights
//   plus the gap sum G = sum_j w_j (M - x_j), whose terms are all >= 0 for weights
//   >= 0. G needs M, so the kernels add it up in the second pass over the row
//   (smoothing_gap; row_loss_with_gap); the vocab-parallel row stats, which see only a
//   shard in one pass, keep it relative to a running max instead (gap_fold, gap_at_max).
// Softmax focal: v_j = alpha_j q_j u_j^gamma (1 - gamma p_j log p_j / u_j), u = 1 - p.
// Sigmoid focal: torchvision's RetinaNet loss with smoothed targets (sigmoid_focal).
#pragma once
#include <cstdint>
#include <cstring>

// FO_HD, and on the host always inlined: the math must land in the ISA clone (and the
// vectorised loop) of the CPU kernel that calls it, not in a baseline-ISA function call.
#if defined(__CUDACC__)
#define FO_LOSS_HD FO_HD
#else
#define FO_LOSS_HD FO_HD __attribute__((always_inline))
#endif

namespace fusedopt::loss_math {

constexpr float kInf = __builtin_huge_valf();

FO_LOSS_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FO_LOSS_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// ---------------------------------------------------------------- vectorisable libm

// e^x: n = round(x / ln 2) by the 1.5*2^23 trick, r = x - n ln 2 (Cody-Waite, two parts),
// 2 e^r by 2 (1 + r + r^2 q(r)), q of degree 4 fitted here for the least maximum relative
// error on |r| <= ln(2)/2 (3.4e-9; Taylor needs degree 7 for that), times 2^(n-1) built from the bits of the rounded sum (normal for every n in
// [-125, 128], so no second scaling is needed up to the overflow to inf). Results below
// 2^-125 (x < -86.5) are flushed to 0, -inf gives 0, NaN propagates.
FO_LOSS_HD float exp_core(float x) {
  const float kRound = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 2.0f * 0.0013780922163277864f;
  p = p * r + 2.0f * 0.00836886465549469f;
  p = p * r + 2.0f * 0.04166899621486664f;
  p = p * r + 2.0f * 0.1666651964187622f;
  p = p * r + 2.0f * 0.49999991059303284f;
  p = p * r + 2.0f;
  p = p * r + 2.0f;
  // bits(t) = bits(1.5 * 2^23) + n, whose low 23 bits are zero: the shift leaves n + 126.
  const float half_scale = bits_as_float((float_as_bits(t) + 126u) << 23);
  // x < -86.5 (and -inf) -> 0 by a bit mask, NaN kept: an integer select keeps g++ from
  // threading a constant 0 into the caller's code (which can stop its vectorisation).
  const uint32_t keep = x < -86.5f ? 0u : 0xffffffffu;
  return bits_as_float(float_as_bits(p * half_scale) & keep);
}

// e^x for x <= 0 (or NaN): the softmax exponentials, whose arguments are shifted by the
// row max. No overflow clamp needed.
FO_LOSS_HD float exp_nonpos(float x) { return exp_core(x); }

// e^x for any x. Arguments above 89 are clamped (still overflowing to inf) by an integer
// min on the bits -- positive floats order like their bits, negative ones stay negative
// -- rather than a select of a constant, which g++ would thread into the caller; a NaN
// argument is passed through at the end.
FO_LOSS_HD float exp_poly(float x) {
  const int32_t bits = int32_t(float_as_bits(x));
  const int32_t limit = 0x42b20000;  // 89.0f
  const float clamped = bits_as_float(uint32_t(bits < limit ? bits : limit));
  const float result = exp_core(clamped);
  return x != x ? x : result;
}

// log x: x = 2^e m with m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f / (2 + f),
// log m = 2 atanh(s) = f - s (f - R(s^2)), R by its series (|s| <= 0.172: truncation 2e-9
// relative); e ln 2 added in two parts. Subnormals are scaled by 2^23 first.
// log 0 = -inf, log of a negative number or NaN = NaN, log inf = inf.
FO_LOSS_HD float log_poly(float x) {
  const bool tiny = x < 1.17549435e-38f;
  const float scaled = x * 8388608.0f;
  const float xs = tiny ? scaled : x;
  const uint32_t bits = float_as_bits(xs);
  int32_t e = int32_t((bits >> 23) & 0xffu) - (tiny ? 150 : 127);
  float m = bits_as_float((bits & 0x007fffffu) | 0x3f800000u);
  const bool high = m > 1.41421356f;
  const float half = m * 0.5f;
  m = high ? half : m;
  e = high ? e + 1 : e;
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  float big_r = 2.22222222222222222e-1f;
  big_r = big_r * z + 2.85714285714285714e-1f;
  big_r = big_r * z + 4.0e-1f;
  big_r = big_r * z + 6.66666666666666667e-1f;
  big_r = big_r * z;
  const float ef = float(e);
  const float log_m = f - s * (f - big_r);
  const float result = ef * 0.693145751953125f + (log_m + ef * 1.42860682030941723e-6f);
  const float special = x == 0.0f ? -kInf : (x == kInf ? kInf : bits_as_float(0x7fc00000u));
  return ((x > 0.0f) & (x < kInf)) ? result : special;
}

// e^v - 1: degree-9 Taylor polynomial for |v| < 0.5 (no cancellation), exp_poly(v) - 1
// elsewhere (there |e^v - 1| >= 0.39, so the subtraction is exact to an ulp).
FO_LOSS_HD float expm1_poly(float v) {
  const bool small = (v > -0.5f) & (v < 0.5f);
  const float w = small ? v : 0.0f;
  float p = 2.75573192239858907e-6f;
  p = p * w + 2.48015873015873016e-5f;
  p = p * w + 1.98412698412698413e-4f;
  p = p * w + 1.38888888888888889e-3f;
  p = p * w + 8.33333333333333333e-3f;
  p = p * w + 4.16666666666666667e-2f;
  p = p * w + 1.66666666666666667e-1f;
  p = p * w + 0.5f;
  p = p * w + 1.0f;
  const float near = p * w;
  const float far = exp_poly(v) - 1.0f;
  return small ? near : far;
}

// log(1 + v) for v >= -1: log(u) * v / (u - 1) with u = 1 + v corrects the rounding of u.
FO_LOSS_HD float log1p_poly(float v) {
  const float u = 1.0f + v;
  const float d = u - 1.0f;
  const float quotient = v / d;
  const float ratio = d == 0.0f ? 1.0f : quotient;
  const float corrected = log_poly(u) * ratio;
  return (u == 1.0f) ? v : (u == kInf ? kInf : corrected);
}

// tanh z = -expm1(-2|z|) / (2 + expm1(-2|z|)), sign restored: exact limits at +-inf.
FO_LOSS_HD float tanh_poly(float z) {
  const float e = expm1_poly(-2.0f * (z < 0.0f ? -z : z));
  const float t = -e / (2.0f + e);
  return z < 0.0f ? -t : t;
}

// The functions the element math below uses: the C library on the device, the
// vectorisable polynomials on the host.
#if defined(__CUDA_ARCH__)
FO_LOSS_HD float fexp(float x) { return ::expf(x); }
FO_LOSS_HD float fexp_nonpos(float x) { return ::expf(x); }
FO_LOSS_HD float flog(float x) { return ::logf(x); }
FO_LOSS_HD float fexpm1(float x) { return ::expm1f(x); }
FO_LOSS_HD float flog1p(float x) { return ::log1pf(x); }
FO_LOSS_HD float ftanh(float x) { return ::tanhf(x); }
#else
FO_LOSS_HD float fexp(float x) { return exp_poly(x); }
FO_LOSS_HD float fexp_nonpos(float x) { return exp_nonpos(x); }
FO_LOSS_HD float flog(float x) { return log_poly(x); }
FO_LOSS_HD float fexpm1(float x) { return expm1_poly(x); }
FO_LOSS_HD float flog1p(float x) { return log1p_poly(x); }
FO_LOSS_HD float ftanh(float x) { return tanh_poly(x); }
#endif

// ---------------------------------------------------------------- softmax helpers

// Logit soft-capping x -> s tanh(x / s), and its slope dx'/dx = 1 - (x'/s)^2.
FO_LOSS_HD float softcap_value(float x, float cap) { return cap * ftanh(x / cap); }
FO_LOSS_HD float softcap_slope(float capped, float cap) {
  const float t = capped / cap;
  return 1.0f - t * t;
}

// Fold x into a lane's (max m, d = sum exp(x_k - m)) with one exponential: the smaller of
// (m, x) is shifted by the larger. -inf logits add nothing; a NaN logit makes d NaN, also
// when it is the first value of its lane (m still -inf: e = exp(NaN), not the 0 of a -inf).
FO_LOSS_HD void lse_fold(float& m, float& d, float x) {
  const bool up = x > m;
  const float hi = up ? x : m;
  const float lo = up ? m : x;
  const float shifted = fexp_nonpos(lo - hi);
  const float e = (hi == -kInf) & (lo == lo) ? 0.0f : shifted;
  const float d_up = d * e + 1.0f;
  const float d_same = d + e;
  d = up ? d_up : d_same;
  m = hi;
}

// Merge lane (m2, d2) into (m, d).
FO_LOSS_HD void lse_merge(float& m, float& d, float m2, float d2) {
  const bool up = m2 > m;
  const float hi = up ? m2 : m;
  const float shifted = fexp_nonpos((up ? m : m2) - hi);
  const float e = hi == -kInf ? 0.0f : shifted;
  const float d_up = d * e + d2;
  const float d_same = d + d2 * e;
  d = up ? d_up : d_same;
  m = hi;
}

// The merged sum of a row, NaN when its max is +inf: torch's log-softmax is then NaN for
// the whole row (x - lse = inf - inf), while the online sum would be finite (exp(x - inf)
// = 0 for the finite logits, 1 for the +inf one) and give an infinite loss.
FO_LOSS_HD float lse_sum_at_max(float row_max, float sum) {
  return row_max == kInf ? bits_as_float(0x7fc00000u) : sum;
}

// p_j = exp(x_j - row_max) / sum_k exp(x_k - row_max), with the division folded into a
// per-row coefficient (coef = a / sum gives p_j a): more accurate than exp(x - lse), whose
// argument carries the rounding of lse.
FO_LOSS_HD float shifted_exp(float x, float row_max) { return fexp_nonpos(x - row_max); }

// log p_j = (x_j - row_max) - log_sum: exact for rows of large equal logits, where
// x_j - lse would lose the digits of lse.
FO_LOSS_HD float log_prob(float x, float row_max, float log_sum) { return (x - row_max) - log_sum; }

// Scalars of a class-target cross-entropy row: dloss/dx_j = p_j a - t_j with
// t_j = cw w_j + b [j == y] (cw = 0 without smoothing), and the row loss without its
// smoothing gap term: the final loss is loss + cw G (row_loss_with_gap), G the gap sum.
struct ClassRowCoeffs {
  float loss, a, b, cw;
};

// x_y: the (capped) target logit; sum_w = sum_j w_j (C without weights); scales = [s_ce, s_z].
FO_LOSS_HD ClassRowCoeffs class_row_coeffs(float x_y, float w_y, float row_max, float log_sum,
                                      float sum_w, float eps, float n_cols, float z_loss,
                                      float s_ce, float s_z) {
  const float lse = row_max + log_sum;
  float ce = (1.0f - eps) * w_y * ((row_max - x_y) + log_sum);
  float a = (1.0f - eps) * w_y;
  if (eps > 0.0f) {
    ce += eps / n_cols * (log_sum * sum_w);
    a += eps / n_cols * sum_w;
  }
  ClassRowCoeffs k;
  k.loss = s_ce * ce;
  k.a = s_ce * a;
  if (z_loss > 0.0f) {
    k.loss += s_z * z_loss * lse * lse;
    k.a += 2.0f * s_z * z_loss * lse;
  }
  k.b = s_ce * (1.0f - eps) * w_y;
  k.cw = s_ce * eps / n_cols;
  return k;
}

// One term w (M - x) of a gap sum: x the (capped) logit, w its weight. M - x is exact to
// one rounding and >= 0, so the sum never cancels. A -inf logit gives an infinite term
// (w > 0) or NaN (w = 0), as torch's w * log p does.
FO_LOSS_HD float smoothing_gap(float x, float w, float row_max) { return w * (row_max - x); }

// A gap sum kept in one pass, relative to a running max m (the vocab-parallel row stats,
// which never see the row max): G = sum_k w_k (m - x_k) and W = sum_k w_k. Folding x with
// weight w while the max moves from m to m_new = max(m, x): the earlier terms grow by
// W (m_new - m), the new one is w (m_new - x); every addend is >= 0 for weights >= 0. m - x
// is +inf at a -inf logit, also while m is still -inf (w inf, as above). Only real columns
// may be folded (a padding lane of -inf with w = 0 would add NaN).
FO_LOSS_HD void gap_fold(float& gap, float& sum_w, float m, float x, float w) {
  const float m_new = x > m ? x : m;
  const float lift = m_new - m;
  const float diff = m_new - x;
  gap = gap + sum_w * (m == -kInf ? 0.0f : lift) + w * (x == -kInf ? kInf : diff);
  sum_w = sum_w + w;
}

// A gap sum relative to m moved to the row max M >= m (nothing to move while m is -inf:
// its terms are infinite already).
FO_LOSS_HD float gap_at_max(float gap, float sum_w, float m, float row_max) {
  const float lift = row_max - m;
  return gap + sum_w * (m == -kInf ? 0.0f : lift);
}

// The row loss once the gap sum G is known: `loss` holds everything else (class targets:
// ClassRowCoeffs::loss, coef = cw; soft targets: soft_row_coeffs, coef = s_ce).
FO_LOSS_HD float row_loss_with_gap(float loss, float coef, float gap_sum) {
  return loss + coef * gap_sum;
}

// Soft target weight r_j = w_j ((1-eps) q_j + eps/C).
FO_LOSS_HD float soft_target_weight(float q, float w, float eps, float inv_cols) {
  return w * ((1.0f - eps) * q + eps * inv_cols);
}

// Soft-target row: the loss without its gap term (s_ce log S sum r + z-loss; the gap
// term s_ce sum r_j (M - x_j) is added by row_loss_with_gap) and the coefficient a of
// dloss/dx_j = p_j a - s_ce r_j.
FO_LOSS_HD void soft_row_coeffs(float row_max, float log_sum, float sum_r, float z_loss,
                           float s_ce, float s_z, float& loss, float& a) {
  const float lse = row_max + log_sum;
  loss = s_ce * (log_sum * sum_r);
  a = s_ce * sum_r;
  if (z_loss > 0.0f) {
    loss += s_z * z_loss * lse * lse;
    a += 2.0f * s_z * z_loss * lse;
  }
}

// ---------------------------------------------------------------- focal helpers

// u^gamma for u >= 0, gamma >= 0, with 0^0 = 1 and 0^gamma = 0 for gamma > 0.
FO_LOSS_HD float focal_pow(float u, float gamma) {
  const float powered = fexp(gamma * flog(u));  // NaN for u = 0, gamma = 0: replaced below
  return u == 0.0f ? (gamma == 0.0f ? 1.0f : 0.0f) : powered;
}

// Softmax focal terms of one class from log p (L): the loss term alpha_q u^gamma L and
// v = alpha_q u^gamma (1 - gamma p L / u); p L / u -> -1 as p -> 1 and 0 as p -> 0.
struct FocalTerms {
  float p, loss, v;
};

FO_LOSS_HD FocalTerms focal_terms(float log_p, float alpha_q, float gamma) {
  const float p = fexp_nonpos(log_p);
  const float u = -fexpm1(log_p);
  const float pw = focal_pow(u, gamma);
  const float p_log_p = p * log_p;
  const float plogp = p > 0.0f ? p_log_p : 0.0f;
  const float quotient = plogp / (u == 0.0f ? 1.0f : u);
  const float ratio = u == 0.0f ? -1.0f : quotient;
  const float term = alpha_q * pw * log_p;
  FocalTerms f;
  f.p = p;
  // a zero weight makes the term 0, also at log p = -inf; a NaN log p (a row of all -inf
  // logits, or holding a NaN) keeps the row's loss NaN
  f.loss = (alpha_q == 0.0f && log_p == log_p) ? 0.0f : term;
  f.v = alpha_q * pw * (1.0f - gamma * ratio);
  return f;
}

// Sigmoid focal loss of one element (logit x, target t, smoothing eps; alpha < 0 disables
// the class balance) and its derivative. p and 1 - p come from e^-|x| without
// cancellation; m = 1 - p_t = p (1 - t') + (1 - p) t'.
struct SigmoidFocal {
  float loss, grad;
};

FO_LOSS_HD SigmoidFocal sigmoid_focal(float x, float t, float alpha, float gamma, float eps) {
  const float tp = t * (1.0f - eps) + 0.5f * eps;
  const float e = fexp_nonpos(-(x < 0.0f ? -x : x));
  const float inv = 1.0f / (1.0f + e);
  const float e_inv = e * inv;
  const float p = x >= 0.0f ? inv : e_inv;
  const float q = x >= 0.0f ? e_inv : inv;  // 1 - p
  const float ce = (x > 0.0f ? x : 0.0f) - x * tp + flog1p(e);
  const float m = p * (1.0f - tp) + q * tp;
  const float mg = focal_pow(m, gamma);
  const float quotient = ce / m;
  const float ce_over_m = m > 0.0f ? quotient : 1.0f;
  const float balance = alpha * tp + (1.0f - alpha) * (1.0f - tp);
  const float bal = alpha >= 0.0f ? balance : 1.0f;
  SigmoidFocal r;
  r.loss = bal * ce * mg;
  r.grad = bal * ((p * (1.0f - tp) - q * tp) * mg +
                  gamma * ce_over_m * mg * p * q * (1.0f - 2.0f * tp));
  return r;
}

}  // namespace fusedopt::loss_math
