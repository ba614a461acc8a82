// Multi-tensor SGD step on CPU tensors (OpenMP over chunks + SIMD inner loops).
//
// Math (fusedopt/math_optim.h, torch.optim.SGD's order, fp32 whatever the storage dtype):
//   d = ((g * inv_scale) * clip_coef) * (maximize ? -1 : 1)  (+ wd*p when wd != 0)
//   momentum != 0:  buf = d if the tensor's `initialized` flag is 0 (torch's first step),
//                   else buf = mu*buf + (1-dampening)*d;  flag = 1 afterwards
//                   d = nesterov ? d + mu*buf : buf
//   p -= lr * d
// skip > 0: nothing is written (params, buffers, masters, flags keep their bits).
//
// Memory traffic per element (B = bytes of the param dtype): reads g, p (2B), writes p (B);
// momentum adds 8 bytes (buf read + written; the first step only writes it); master weights
// read and write an fp32 master instead of reading p.
#include <vector>

#include "fusedopt/cpu_optim.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math.h"
#include "multi_tensor_loop.h"

namespace fusedopt::cpu {
namespace {

// The element loop; kFirst: the momentum buffer holds no value yet (it is only written).
template <typename T, bool kL2, bool kMomentum, bool kNesterov, bool kMaster, bool kFirst>
inline __attribute__((always_inline)) void sgd_loop(T* __restrict param, const T* __restrict grad,
                                                    float* __restrict buffer,
                                                    float* __restrict master, int64_t n,
                                                    const SgdCoefs c, const GradTransform gt) {
  for (int64_t i = 0; i < n; ++i) {
    float p = kMaster ? master[i] : to_float(param[i]);
    const float g = used_grad(to_float(grad[i]), gt);
    float buf = (kMomentum && !kFirst) ? buffer[i] : 0.0f;
    sgd_math<kL2, kMomentum, kNesterov>(p, g, buf, kFirst, c);
    if (kMomentum) buffer[i] = buf;
    if (kMaster) master[i] = p;
    param[i] = from_float<T>(p);
  }
}

template <typename T, bool kL2, bool kMomentum, bool kNesterov, bool kMaster>
FO_CPU_CLONES void sgd_chunk(T* __restrict param, const T* __restrict grad,
                             float* __restrict buffer, float* __restrict master, int64_t n,
                             bool first, const SgdCoefs c, const GradTransform gt) {
  if (kMomentum && first)
    sgd_loop<T, kL2, kMomentum, kNesterov, kMaster, true>(param, grad, buffer, master, n, c, gt);
  else
    sgd_loop<T, kL2, kMomentum, kNesterov, kMaster, false>(param, grad, buffer, master, n, c, gt);
}

template <typename T, bool kL2, bool kMomentum, bool kNesterov, bool kMaster>
void run_sgd(const SgdTensors& t, const MultiTensorPlan& plan, const std::vector<char>& first,
             const SgdCoefs c, const GradTransform gt) {
  for_each_chunk(plan, t.numel, [&](int32_t i, int64_t, int64_t start, int64_t len) {
    sgd_chunk<T, kL2, kMomentum, kNesterov, kMaster>(
        static_cast<T*>(t.params[i]) + start, static_cast<const T*>(t.grads[i]) + start,
        kMomentum ? t.momentum_buffer[i] + start : nullptr,
        kMaster ? t.master[i] + start : nullptr, len, first[i] != 0, c, gt);
  });
}

}  // namespace

int sgd_step(const SgdTensors& t, const SgdParams& p, const MultiTensorPlan& plan) {
  if (t.dtype < 0 || t.dtype > 2) return kOptimBadDType;
  const bool with_momentum = p.momentum != 0.0;
  if (with_momentum && t.num_tensors > 0 &&
      (t.momentum_buffer == nullptr || t.initialized == nullptr))
    return kOptimBadArgument;
  if (p.skip != nullptr && *p.skip > 0.0f) return kOptimOk;

  // 1. per tensor: does its momentum buffer hold a value yet (read before any chunk runs)
  std::vector<char> first(static_cast<size_t>(t.num_tensors), 0);
  if (with_momentum)
    for (int64_t i = 0; i < t.num_tensors; ++i) first[i] = *t.initialized[i] == 0.0f;
  const double lr = p.lr.ptr ? static_cast<double>(*p.lr.ptr) : p.lr.value;
  const SgdCoefs c = sgd_coefs(lr, p.momentum, p.dampening, p.weight_decay);
  const GradTransform gt{scalar_or(p.inv_scale, 1.0f), scalar_or(p.clip_coef, 1.0f),
                         p.maximize ? -1.0f : 1.0f};

  // 2. the element loop over every chunk
  FO_DTYPE_SWITCH(t.dtype, T, [&] {
    FO_BOOL_SWITCH(p.weight_decay != 0.0, kL2, [&] {
      FO_BOOL_SWITCH(with_momentum, kMomentum, [&] {
        FO_BOOL_SWITCH(with_momentum && p.nesterov, kNesterovFlag, [&] {
          constexpr bool kNesterov = kMomentum && kNesterovFlag;  // no dead instantiations
          FO_BOOL_SWITCH(t.master != nullptr, kMaster, [&] {
            run_sgd<T, kL2, kMomentum, kNesterov, kMaster>(t, plan, first, c, gt);
          });
        });
      });
    });
  });

  // 3. the flags, once every chunk that read them is done
  if (with_momentum)
    for (int64_t i = 0; i < t.num_tensors; ++i) *t.initialized[i] = 1.0f;
  return kOptimOk;
}

}  // namespace fusedopt::cpu
