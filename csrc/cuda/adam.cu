// Multi-tensor Adam / AdamW step on CUDA tensors.
//
// Math (fusedopt/math_optim.h, the one copy shared with the cpu backend; fp32 whatever the
// storage dtype):
//   g' = ((g * inv_scale) * clip_coef) * (maximize ? -1 : 1)
//   Adam: g' += wd*p          AdamW: p *= 1 - lr*wd
//   m = lerp(m, g', 1-b1)     v = b2*v + (1-b2)*g'^2     (amsgrad: vmax = max(vmax, v))
//   p -= lr/(1-b1^t) * m / (sqrt(v or vmax)/sqrt(1-b2^t) + eps),   t = step + 1
// The coefficients of a tensor are formed once per block (thread 0, in double, rounded to
// fp32 once) from its step counter, lr/beta1/beta2 (host values or device scalars) and
// shared through shared memory. skip > 0 (a device scalar): every block returns before
// reading anything else, the counter launch writes nothing either.
//
// Launches: the update over every chunk (multi_tensor_apply.cuh; one block per chunk of
// 65536 elements, 512 threads, groups of 4 consecutive elements per thread: one 16-byte
// access per fp32 list (8 bytes for bf16/fp16 params and grads) when every list of the
// chunk is aligned, element accesses otherwise), then the step counters (+1) in a launch
// of their own, so that all blocks of a tensor used the same t.
//
// Memory traffic per element (fp32 states, B = bytes of the param dtype): reads g, p, m, v
// (2B + 8 bytes), writes p, m, v (B + 8): 28 bytes for fp32; amsgrad +8; an fp32 master is
// read and written instead of reading p (4 + B + 4 bytes instead of 2B).
#include "fusedopt/cuda_optim.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math.h"
#include "multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

// lists of the Adam table
enum AdamList { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kMaster, kStep, kAdamLists };

struct AdamArgs {
  ScalarArg lr, beta1, beta2;
  double eps, weight_decay;
  bool decoupled, l2, with_master;
  float sign;
  const float* inv_scale;
  const float* clip_coef;
  const float* skip;
};

__device__ __forceinline__ double read(const ScalarArg& a) {
  return a.ptr ? static_cast<double>(*a.ptr) : a.value;
}

template <typename T, bool kAmsgrad>
struct AdamChunk {
  AdamArgs a;

  __device__ void operator()(const TensorTable<kAdamLists>& tab, int slot, int, int64_t start,
                             int64_t n) const {
    if (a.skip != nullptr && *a.skip > 0.0f) return;
    __shared__ AdamCoefs shared_coefs;
    __shared__ GradTransform shared_gt;
    if (threadIdx.x == 0) {
      const float t = *static_cast<const float*>(tab.ptr[kStep][slot]) + 1.0f;
      shared_coefs = adam_coefs(read(a.lr), read(a.beta1), read(a.beta2), a.eps,
                                a.weight_decay, a.decoupled, t);
      shared_gt = GradTransform{scalar_or(a.inv_scale, 1.0f), scalar_or(a.clip_coef, 1.0f),
                                a.sign};
    }
    __syncthreads();
    const AdamCoefs c = shared_coefs;
    const GradTransform gt = shared_gt;
    T* param = static_cast<T*>(tab.ptr[kParam][slot]) + start;
    const T* grad = static_cast<const T*>(tab.ptr[kGrad][slot]) + start;
    float* m_ptr = static_cast<float*>(tab.ptr[kExpAvg][slot]) + start;
    float* v_ptr = static_cast<float*>(tab.ptr[kExpAvgSq][slot]) + start;
    float* vmax_ptr = kAmsgrad ? static_cast<float*>(tab.ptr[kMaxExpAvgSq][slot]) + start : nullptr;
    float* master = a.with_master ? static_cast<float*>(tab.ptr[kMaster][slot]) + start : nullptr;
    const bool aligned = group_aligned<T>(param) && group_aligned<T>(grad) &&
                         group_aligned<float>(m_ptr) && group_aligned<float>(v_ptr) &&
                         (!kAmsgrad || group_aligned<float>(vmax_ptr)) &&
                         (master == nullptr || group_aligned<float>(master));

    for_each_group(n, aligned, [&](int64_t first, bool whole) {
      float p[kIlp], g[kIlp], m[kIlp], v[kIlp], vmax[kIlp] = {};
      if (master)
        load_group(master, first, n, whole, p);
      else
        load_group(param, first, n, whole, p);
      load_group(grad, first, n, whole, g);
      load_group(m_ptr, first, n, whole, m);
      load_group(v_ptr, first, n, whole, v);
      if (kAmsgrad) load_group(vmax_ptr, first, n, whole, vmax);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        g[k] = used_grad(g[k], gt);
        if (a.l2)
          adam_math<true, kAmsgrad>(p[k], g[k], m[k], v[k], vmax[k], c);
        else
          adam_math<false, kAmsgrad>(p[k], g[k], m[k], v[k], vmax[k], c);
      }
      store_group(m_ptr, first, n, whole, m);
      store_group(v_ptr, first, n, whole, v);
      if (kAmsgrad) store_group(vmax_ptr, first, n, whole, vmax);
      if (master) store_group(master, first, n, whole, p);
      store_group(param, first, n, whole, p);
    });
  }
};

}  // namespace

int max_tensors_per_launch() { return kMaxTensors; }
int max_chunks_per_launch() { return kMaxChunks; }
int64_t default_chunk_size() { return kChunkSize; }

cudaError_t adam_step(const AdamTensors& t, const AdamParams& p, const MultiTensorPlan& plan,
                      cudaStream_t stream) {
  if (t.dtype < 0 || t.dtype > 2 || t.num_tensors < 0) return cudaErrorInvalidValue;
  if (t.num_tensors == 0) return cudaSuccess;
  if (p.amsgrad && t.max_exp_avg_sq == nullptr) return cudaErrorInvalidValue;
  if (!plan_fits(plan)) return cudaErrorInvalidValue;
  AdamArgs a{p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, p.decoupled,
             !p.decoupled && p.weight_decay != 0.0, t.master != nullptr,
             p.maximize ? -1.0f : 1.0f, p.inv_scale, p.clip_coef, p.skip};
  const auto fill = [&](TensorTable<kAdamLists>& tab, int slot, int32_t i) {
    tab.ptr[kParam][slot] = t.params[i];
    tab.ptr[kGrad][slot] = const_cast<void*>(t.grads[i]);
    tab.ptr[kExpAvg][slot] = t.exp_avg[i];
    tab.ptr[kExpAvgSq][slot] = t.exp_avg_sq[i];
    tab.ptr[kMaxExpAvgSq][slot] = p.amsgrad ? t.max_exp_avg_sq[i] : nullptr;
    tab.ptr[kMaster][slot] = t.master ? t.master[i] : nullptr;
    tab.ptr[kStep][slot] = t.step[i];
  };
  const cudaError_t err = FO_DTYPE_SWITCH(t.dtype, T, [&] {
    return FO_BOOL_SWITCH(p.amsgrad, kAmsgrad, [&] {
      return launch_multi_tensor<kAdamLists>(plan, t.numel, fill, AdamChunk<T, kAmsgrad>{a},
                                             stream);
    });
  });
  if (err != cudaSuccess) return err;
  return update_counters(t.step, t.num_tensors, /*set_one=*/false, p.skip, stream);
}

}  // namespace fusedopt::cuda
