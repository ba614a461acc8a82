// Multi-tensor SGD step on CUDA tensors (torch.optim.SGD semantics).
//
// Math (fusedopt/math_optim.h, shared with the cpu backend; fp32 whatever the storage):
//   d = g' = ((g * inv_scale) * clip_coef) * (maximize ? -1 : 1);  wd != 0: d = fma(wd, p, d)
//   momentum: buf = d on the tensor's first step (its "initialised" flag is 0), else
//             buf = fma(1 - dampening, d, buf * momentum);  d = nesterov ? fma(mu, buf, d) : buf
//   p = fma(-lr, d, p)
// lr is a host value or a device scalar; skip > 0 (device scalar): nothing is written.
//
// Launches: the update over every chunk (multi_tensor_apply.cuh; groups of 4 consecutive
// elements per thread, vector accesses when every list of the chunk is aligned), then,
// with momentum, the "initialised" flags set to 1 in a launch of their own (every block of
// the update read the flag from before the step).
//
// Memory traffic per element (B = bytes of the param dtype): reads g, p (2B), writes p (B);
// momentum adds 8 bytes (4 on the first step: the buffer is only written); an fp32 master
// is read and written instead of reading p.
#include "fusedopt/cuda_optim.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math.h"
#include "multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

enum SgdList { kParam, kGrad, kBuffer, kMaster, kInitialized, kSgdLists };

struct SgdArgs {
  ScalarArg lr;
  double momentum, dampening, weight_decay;
  bool l2, with_master;
  float sign;
  const float* inv_scale;
  const float* clip_coef;
  const float* skip;
};

template <typename T, bool kMomentum, bool kNesterov>
struct SgdChunk {
  SgdArgs a;

  __device__ void operator()(const TensorTable<kSgdLists>& tab, int slot, int, int64_t start,
                             int64_t n) const {
    if (a.skip != nullptr && *a.skip > 0.0f) return;
    const double lr = a.lr.ptr ? static_cast<double>(*a.lr.ptr) : a.lr.value;
    const SgdCoefs c = sgd_coefs(lr, a.momentum, a.dampening, a.weight_decay);
    const GradTransform gt{scalar_or(a.inv_scale, 1.0f), scalar_or(a.clip_coef, 1.0f), a.sign};
    const bool first_step =
        kMomentum && *static_cast<const float*>(tab.ptr[kInitialized][slot]) == 0.0f;
    T* param = static_cast<T*>(tab.ptr[kParam][slot]) + start;
    const T* grad = static_cast<const T*>(tab.ptr[kGrad][slot]) + start;
    float* buffer = kMomentum ? static_cast<float*>(tab.ptr[kBuffer][slot]) + start : nullptr;
    float* master = a.with_master ? static_cast<float*>(tab.ptr[kMaster][slot]) + start : nullptr;
    const bool aligned = group_aligned<T>(param) && group_aligned<T>(grad) &&
                         (!kMomentum || group_aligned<float>(buffer)) &&
                         (master == nullptr || group_aligned<float>(master));

    for_each_group(n, aligned, [&](int64_t first, bool whole) {
      float p[kIlp], g[kIlp], buf[kIlp] = {};
      if (master)
        load_group(master, first, n, whole, p);
      else
        load_group(param, first, n, whole, p);
      load_group(grad, first, n, whole, g);
      if (kMomentum && !first_step) load_group(buffer, first, n, whole, buf);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        g[k] = used_grad(g[k], gt);
        if (a.l2)
          sgd_math<true, kMomentum, kNesterov>(p[k], g[k], buf[k], first_step, c);
        else
          sgd_math<false, kMomentum, kNesterov>(p[k], g[k], buf[k], first_step, c);
      }
      if (kMomentum) store_group(buffer, first, n, whole, buf);
      if (master) store_group(master, first, n, whole, p);
      store_group(param, first, n, whole, p);
    });
  }
};

}  // namespace

cudaError_t sgd_step(const SgdTensors& t, const SgdParams& p, const MultiTensorPlan& plan,
                     cudaStream_t stream) {
  if (t.dtype < 0 || t.dtype > 2 || t.num_tensors < 0) return cudaErrorInvalidValue;
  if (t.num_tensors == 0) return cudaSuccess;
  const bool with_momentum = p.momentum != 0.0;
  if (with_momentum && (t.momentum_buffer == nullptr || t.initialized == nullptr))
    return cudaErrorInvalidValue;
  if (!plan_fits(plan)) return cudaErrorInvalidValue;
  const SgdArgs a{p.lr, p.momentum, p.dampening, p.weight_decay, p.weight_decay != 0.0,
                  t.master != nullptr, p.maximize ? -1.0f : 1.0f, p.inv_scale, p.clip_coef,
                  p.skip};
  const auto fill = [&](TensorTable<kSgdLists>& tab, int slot, int32_t i) {
    tab.ptr[kParam][slot] = t.params[i];
    tab.ptr[kGrad][slot] = const_cast<void*>(t.grads[i]);
    tab.ptr[kBuffer][slot] = with_momentum ? t.momentum_buffer[i] : nullptr;
    tab.ptr[kMaster][slot] = t.master ? t.master[i] : nullptr;
    tab.ptr[kInitialized][slot] = with_momentum ? t.initialized[i] : nullptr;
  };
  const cudaError_t err = FO_DTYPE_SWITCH(t.dtype, T, [&] {
    if (!with_momentum)
      return launch_multi_tensor<kSgdLists>(plan, t.numel, fill, SgdChunk<T, false, false>{a},
                                            stream);
    return FO_BOOL_SWITCH(p.nesterov, kNesterov, [&] {
      return launch_multi_tensor<kSgdLists>(plan, t.numel, fill,
                                            SgdChunk<T, true, kNesterov>{a}, stream);
    });
  });
  if (err != cudaSuccess || !with_momentum) return err;
  return update_counters(t.initialized, t.num_tensors, /*set_one=*/true, p.skip, stream);
}

}  // namespace fusedopt::cuda
