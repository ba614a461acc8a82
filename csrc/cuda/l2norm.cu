// Multi-tensor sum of squares and inf/NaN flag on CUDA tensors: the norm pass of the
// optimizers (gradient clipping, loss-scale overflow check).
//
//   out[0] = (sum over every element x of every tensor of x^2) * inv_scale^2
//   out[1] = 1 if any element is inf/NaN else 0
//
// Accumulation is in double (as on the cpu backend): the square of a finite fp32/bf16/fp16
// value is at most about 1.2e77, so the sum is finite exactly when every element is, and
// one pass gives both the sum and the flag. Deterministic, no atomics, two stages:
//   1. one block per chunk of the plan (multi_tensor_apply.cuh): thread j sums the groups
//      of 4 consecutive elements j, j + 512, ... of the chunk in order (one vector load per
//      group when aligned, element loads otherwise: the same order either way), the 512
//      partial sums are folded pairwise in shared memory, and the block stores its partial
//      at the chunk's plan-wide index;
//   2. one block adds the partials: thread j sums partials j, j + 512, ... in order, then
//      the same pairwise fold; thread 0 scales by inv_scale^2 and writes out[0..1].
// The order depends only on the tensor sizes and the chunk size, never on scheduling.
//
// Memory traffic: reads every element once (B bytes each), 8 bytes per chunk written and
// read back, 8 bytes written at the end.
#include "fusedopt/cuda_optim.h"
#include "fusedopt/dispatch.h"
#include "multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

// Pairwise fold of one double per thread of the block; the result is in lane[0].
__device__ double block_sum(double own, double* lane) {
  lane[threadIdx.x] = own;
  __syncthreads();
  for (int width = kBlockThreads / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) lane[threadIdx.x] += lane[threadIdx.x + width];
    __syncthreads();
  }
  return lane[0];
}

template <typename T>
struct NormChunk {
  double* partials;

  __device__ void operator()(const TensorTable<1>& tab, int slot, int chunk, int64_t start,
                             int64_t n) const {
    __shared__ double lane[kBlockThreads];
    const T* x = static_cast<const T*>(tab.ptr[0][slot]) + start;
    double own = 0.0;
    for_each_group(n, group_aligned<T>(x), [&](int64_t first, bool whole) {
      float v[kIlp];
      load_group(x, first, n, whole, v);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) own += static_cast<double>(v[k]) * v[k];
    });
    const double total = block_sum(own, lane);
    if (threadIdx.x == 0) partials[tab.first_chunk + chunk] = total;
  }
};

__global__ void __launch_bounds__(kBlockThreads)
    finish_norm(const double* partials, int64_t num_chunks, const float* inv_scale, float* out) {
  __shared__ double lane[kBlockThreads];
  double own = 0.0;
  for (int64_t c = threadIdx.x; c < num_chunks; c += kBlockThreads) own += partials[c];
  const double total = block_sum(own, lane);
  if (threadIdx.x == 0) {
    const double inv = inv_scale ? static_cast<double>(*inv_scale) : 1.0;
    out[0] = static_cast<float>(total * (inv * inv));
    out[1] = isfinite(total) ? 0.0f : 1.0f;
  }
}

}  // namespace

cudaError_t l2norm(const NormTensors& t, const MultiTensorPlan& plan, double* partials,
                   cudaStream_t stream) {
  if (t.dtype < 0 || t.dtype > 2 || t.num_tensors < 0 || t.out == nullptr)
    return cudaErrorInvalidValue;
  if (plan.num_chunks() > 0 && partials == nullptr) return cudaErrorInvalidValue;
  if (!plan_fits(plan)) return cudaErrorInvalidValue;
  const auto fill = [&](TensorTable<1>& tab, int slot, int32_t i) {
    tab.ptr[0][slot] = const_cast<void*>(t.tensors[i]);
  };
  const cudaError_t err = FO_DTYPE_SWITCH(t.dtype, T, [&] {
    return launch_multi_tensor<1>(plan, t.numel, fill, NormChunk<T>{partials}, stream);
  });
  if (err != cudaSuccess) return err;
  finish_norm<<<1, kBlockThreads, 0, stream>>>(partials, plan.num_chunks(), t.inv_scale, t.out);
  return cudaGetLastError();
}

}  // namespace fusedopt::cuda
