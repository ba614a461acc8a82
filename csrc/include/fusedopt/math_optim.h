// Element math of the optimizers, shared unchanged by the CPU and CUDA kernels (FO_HD,
// plain C float math). The per-tensor coefficients are formed once per tensor and step
// (in double, like torch's Python-float scalars, then rounded to fp32 once); the element
// functions then follow the arithmetic of torch.optim's single-tensor path on CPU in fp32,
// including where torch's vectorised kernels fuse a multiply-add (fma below):
//
//   g' = ((g * inv_scale) * clip_coef) * sign            sign = -1 when maximize
//   Adam:  L2:  g' = fma(wd, p, g')   decoupled (AdamW):  p = p * (1 - lr*wd)
//          m = lerp(m, g', 1-b1)  = fma(w, g'-m, m)  (w < 0.5)  or  fma(w-1, g'-m, g')
//          v = fma((1-b2)*g', g', v*b2)                    vmax = max(vmax, v)
//          p = p + (-lr/(1-b1^t) * m) / (sqrt(v or vmax) / sqrt(1-b2^t) + eps)
//   SGD:   d = g'  (wd != 0: fma(wd, p, g'))
//          buf = d on the first step, else fma(1-damp, d, buf*mu)
//          d = nesterov ? fma(mu, buf, d) : buf            p = fma(-lr, d, p)
//
// The remaining difference to torch on CPU is its division by a scalar (sqrt(v) / bc2),
// which its AVX-512 build does not round correctly in about 0.5% of the elements (1 ulp).
#pragma once

#if !defined(__CUDACC__)
#include <cmath>
#endif

#ifndef FO_HD
#if defined(__CUDACC__)
#define FO_HD __host__ __device__ __forceinline__
#else
#define FO_HD inline
#endif
#endif

namespace fusedopt {

// torch's lerp: start + w*(end-start) anchored at the nearer end, so that both ends are
// reproduced exactly: fma(w, d, start) when |w| < 0.5, else fma(w - 1, d, end).
struct LerpWeight {
  float coef;   // w, or w - 1 (formed in fp32)
  int small;    // |w| < 0.5: anchored at the start (an int: a 4-byte flag vectorises)
};

FO_HD LerpWeight make_lerp_weight(double weight) {
  const float w = static_cast<float>(weight);
  LerpWeight out;
  out.small = (w < 0.5f && w > -0.5f);
  out.coef = out.small ? w : w - 1.0f;
  return out;
}

FO_HD float lerp_value(float start, float end, const LerpWeight& lw) {
  return ::fmaf(lw.coef, end - start, lw.small ? start : end);
}

// The gradient the update uses: unscaled, clipped, negated for maximize. inv_scale and
// clip_coef are 1 when absent (a product by 1 is exact), sign is -1 for maximize else 1.
struct GradTransform {
  float inv_scale;
  float clip_coef;
  float sign;
};

FO_HD float used_grad(float g, const GradTransform& gt) {
  return ((g * gt.inv_scale) * gt.clip_coef) * gt.sign;
}

// ---------------------------------------------------------------- Adam / AdamW

struct AdamCoefs {
  LerpWeight m_weight;   // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float neg_step_size;   // -lr / (1 - beta1^t)
  float bc2_sqrt;        // sqrt(1 - beta2^t)
  float eps;
  float l2;              // weight decay added to the gradient (Adam), else 0
  float param_decay;     // 1 - lr*wd (AdamW), else 1
};

// Coefficients of one tensor for the step that makes its counter `t` (already incremented).
FO_HD AdamCoefs adam_coefs(double lr, double beta1, double beta2, double eps,
                           double weight_decay, bool decoupled, double t) {
  AdamCoefs c;
  c.m_weight = make_lerp_weight(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.neg_step_size = static_cast<float>(-(lr / (1.0 - ::pow(beta1, t))));
  c.bc2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(beta2, t)));
  c.eps = static_cast<float>(eps);
  c.l2 = decoupled ? 0.0f : static_cast<float>(weight_decay);
  c.param_decay = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  return c;
}

// One element. `p` is the fp32 value of the param (or its master); kL2: Adam with
// weight_decay != 0 (torch skips the add when it is 0). vmax is used only with kAmsgrad.
template <bool kL2, bool kAmsgrad>
FO_HD void adam_math(float& p, float g, float& m, float& v, float& vmax, const AdamCoefs& c) {
  p = p * c.param_decay;
  if (kL2) g = ::fmaf(c.l2, p, g);
  m = lerp_value(m, g, c.m_weight);
  v = ::fmaf(c.one_minus_beta2 * g, g, v * c.beta2);
  float v_used = v;
  if (kAmsgrad) {
    vmax = (v < vmax || vmax != vmax) ? vmax : v;  // torch.maximum: a NaN on either side wins
    v_used = vmax;
  }
  const float denom = ::sqrtf(v_used) / c.bc2_sqrt + c.eps;
  p = p + (c.neg_step_size * m) / denom;
}

// ---------------------------------------------------------------- SGD

struct SgdCoefs {
  float neg_lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
};

FO_HD SgdCoefs sgd_coefs(double lr, double momentum, double dampening, double weight_decay) {
  SgdCoefs c;
  c.neg_lr = static_cast<float>(-lr);
  c.momentum = static_cast<float>(momentum);
  c.one_minus_dampening = static_cast<float>(1.0 - dampening);
  c.weight_decay = static_cast<float>(weight_decay);
  return c;
}

// One element. kL2: weight_decay != 0; kMomentum: momentum != 0 (buf used); `first`: the
// momentum buffer holds no value yet (torch's first step copies d into it).
template <bool kL2, bool kMomentum, bool kNesterov>
FO_HD void sgd_math(float& p, float g, float& buf, bool first, const SgdCoefs& c) {
  float d = g;
  if (kL2) d = ::fmaf(c.weight_decay, p, d);
  if (kMomentum) {
    buf = first ? d : ::fmaf(c.one_minus_dampening, d, buf * c.momentum);
    d = kNesterov ? ::fmaf(c.momentum, buf, d) : buf;
  }
  p = ::fmaf(c.neg_lr, d, p);
}

}  // namespace fusedopt
