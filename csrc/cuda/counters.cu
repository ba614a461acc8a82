// Per-tensor counters of the optimizer steps on CUDA: Adam's step counters (+1) and SGD's
// "momentum buffer initialised" flags (= 1), written by a launch of their own after the
// update launches of a step (see multi_tensor_apply.cuh), so every block of the update read
// the values from before the step. The addresses go by value, kCounterBatch per launch.
// Traffic: 4 bytes read + 4 written per tensor.
#include "fusedopt/cuda_optim.h"
#include "multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

constexpr int kCounterBatch = 1024;

struct CounterBatch {
  float* ptr[kCounterBatch];
  int n;
};
static_assert(sizeof(CounterBatch) <= 32764, "kernel parameters above 32 KB");

__global__ void counters_kernel(const __grid_constant__ CounterBatch batch, bool set_one,
                                const float* skip) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= batch.n) return;
  if (skip != nullptr && *skip > 0.0f) return;
  float* counter = batch.ptr[i];
  *counter = set_one ? 1.0f : *counter + 1.0f;
}

}  // namespace

cudaError_t update_counters(float* const* counters, int64_t n, bool set_one, const float* skip,
                            cudaStream_t stream) {
  for (int64_t begin = 0; begin < n; begin += kCounterBatch) {
    CounterBatch batch{};
    batch.n = static_cast<int>(n - begin < kCounterBatch ? n - begin : kCounterBatch);
    for (int i = 0; i < batch.n; ++i) batch.ptr[i] = counters[begin + i];
    constexpr int kThreads = 256;
    counters_kernel<<<(batch.n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(batch, set_one,
                                                                                  skip);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace fusedopt::cuda
