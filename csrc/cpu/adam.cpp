// Multi-tensor Adam / AdamW step on CPU tensors (OpenMP over chunks + SIMD inner loops).
//
// Math (fusedopt/math_optim.h, torch.optim's order, fp32 whatever the storage dtype):
//   g' = ((g * inv_scale) * clip_coef) * (maximize ? -1 : 1)
//   Adam: g' += wd*p          AdamW: p *= 1 - lr*wd
//   m = lerp(m, g', 1-b1)     v = b2*v + (1-b2)*g'^2     (amsgrad: vmax = max(vmax, v))
//   p -= lr/(1-b1^t) * m / (sqrt(v or vmax)/sqrt(1-b2^t) + eps),   t = step + 1
// with the bias corrections of each tensor formed once per step in double.
// skip > 0: nothing is written (params, states, masters, steps keep their bits).
//
// Memory traffic per element (fp32 states, B = bytes of the param dtype):
//   reads g, p, m, v (2B + 8 bytes), writes p, m, v (B + 8 bytes): 28 bytes for fp32;
//   amsgrad adds 8 bytes (vmax read + written); master weights read and write an fp32
//   master instead of reading p (4 + B + 4 bytes instead of 2B).
#include <vector>

#include "fusedopt/cpu_optim.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math.h"
#include "multi_tensor_loop.h"

namespace fusedopt::cpu {
namespace {

template <typename T, bool kL2, bool kAmsgrad, bool kMaster>
FO_CPU_CLONES void adam_chunk(T* __restrict param, const T* __restrict grad,
                              float* __restrict exp_avg, float* __restrict exp_avg_sq,
                              float* __restrict max_exp_avg_sq, float* __restrict master,
                              int64_t n, const AdamCoefs c, const GradTransform gt) {
  for (int64_t i = 0; i < n; ++i) {
    float p = kMaster ? master[i] : to_float(param[i]);
    const float g = used_grad(to_float(grad[i]), gt);
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    float vmax = kAmsgrad ? max_exp_avg_sq[i] : 0.0f;
    adam_math<kL2, kAmsgrad>(p, g, m, v, vmax, c);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (kAmsgrad) max_exp_avg_sq[i] = vmax;
    if (kMaster) master[i] = p;
    param[i] = from_float<T>(p);
  }
}

template <typename T, bool kL2, bool kAmsgrad, bool kMaster>
void run_adam(const AdamTensors& t, const MultiTensorPlan& plan,
              const std::vector<AdamCoefs>& coefs, const GradTransform gt) {
  for_each_chunk(plan, t.numel, [&](int32_t i, int64_t, int64_t start, int64_t len) {
    adam_chunk<T, kL2, kAmsgrad, kMaster>(
        static_cast<T*>(t.params[i]) + start, static_cast<const T*>(t.grads[i]) + start,
        t.exp_avg[i] + start, t.exp_avg_sq[i] + start,
        kAmsgrad ? t.max_exp_avg_sq[i] + start : nullptr,
        kMaster ? t.master[i] + start : nullptr, len, coefs[i], gt);
  });
}

double read_scalar(const ScalarArg& a) { return a.ptr ? static_cast<double>(*a.ptr) : a.value; }

}  // namespace

int adam_step(const AdamTensors& t, const AdamParams& p, const MultiTensorPlan& plan) {
  if (t.dtype < 0 || t.dtype > 2) return kOptimBadDType;
  if (p.amsgrad && t.max_exp_avg_sq == nullptr && t.num_tensors > 0) return kOptimBadArgument;
  if (p.skip != nullptr && *p.skip > 0.0f) return kOptimOk;

  // 1. per tensor: the incremented step and its coefficients (double, rounded once)
  const double lr = read_scalar(p.lr), beta1 = read_scalar(p.beta1), beta2 = read_scalar(p.beta2);
  std::vector<AdamCoefs> coefs(static_cast<size_t>(t.num_tensors));
  std::vector<float> new_step(static_cast<size_t>(t.num_tensors));
  for (int64_t i = 0; i < t.num_tensors; ++i) {
    new_step[i] = *t.step[i] + 1.0f;
    coefs[i] = adam_coefs(lr, beta1, beta2, p.eps, p.weight_decay, p.decoupled, new_step[i]);
  }
  const GradTransform gt{scalar_or(p.inv_scale, 1.0f), scalar_or(p.clip_coef, 1.0f),
                         p.maximize ? -1.0f : 1.0f};

  // 2. the element loop over every chunk
  const bool l2 = !p.decoupled && p.weight_decay != 0.0;
  FO_DTYPE_SWITCH(t.dtype, T, [&] {
    FO_BOOL_SWITCH(l2, kL2, [&] {
      FO_BOOL_SWITCH(p.amsgrad, kAmsgrad, [&] {
        FO_BOOL_SWITCH(t.master != nullptr, kMaster,
                       [&] { run_adam<T, kL2, kAmsgrad, kMaster>(t, plan, coefs, gt); });
      });
    });
  });

  // 3. the step counters, once every chunk that read them is done
  for (int64_t i = 0; i < t.num_tensors; ++i) *t.step[i] = new_step[i];
  return kOptimOk;
}

}  // namespace fusedopt::cpu
