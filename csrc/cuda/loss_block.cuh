// Building blocks of the CUDA loss kernels (cross_entropy.cu, focal.cu): one block of
// kLossThreads threads per row, the row walked with 16-byte vector loads where possible,
// an optional copy of the row in shared memory (the row cache) so that later passes do not
// read it from memory again, and deterministic block reductions (warp shuffles in a fixed
// pattern, then the warps' values in warp order), so a result never depends on scheduling.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "fusedopt/dispatch.h"
#include "fusedopt/math.h"
#include "fusedopt/params_loss.h"

namespace fusedopt::cuda {

constexpr int kLossThreads = 256;
constexpr int kLossWarps = kLossThreads / 32;
constexpr unsigned kMaxLossBlocks = 1u << 20;  // rows beyond are walked by a grid-stride loop

// Rows of at most this many bytes (in the logits' dtype: 32,768 bf16/fp16 or 16,384 fp32
// values) are copied into shared memory by the first pass and read from there by the later
// ones. 64 KB is above the 48 KB a block gets without opting in (allow_dynamic_smem); every
// GPU the build targets (sm_80 and newer) allows at least 99 KB.
constexpr int64_t kRowCacheBytes = 64 * 1024;
// Dynamic shared memory a kernel may use without the opt-in, leaving 1 KB for the static
// scratch of the reductions (64 bytes here).
constexpr size_t kSmemWithoutOptIn = 47 * 1024;

using loss_math::kInf;

__device__ __forceinline__ float nan_value() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ int64_t load_index(const void* target, int index_type, int64_t row) {
  switch (static_cast<IndexType>(index_type)) {
    case IndexType::kInt32: return static_cast<const int32_t*>(target)[row];
    case IndexType::kUInt8: return static_cast<const uint8_t*>(target)[row];
    default: return static_cast<const int64_t*>(target)[row];
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// The row cache: the block's dynamic shared memory (16-byte aligned), as values of T.
template <typename T>
__device__ __forceinline__ T* row_cache() {
  extern __shared__ uint4 row_cache_words[];
  return reinterpret_cast<T*>(row_cache_words);
}

// Bytes of row cache for rows of n_cols values of T, or 0 when they do not fit.
template <typename T>
size_t row_cache_bytes(int64_t n_cols) {
  const int64_t bytes = (n_cols * int64_t(sizeof(T)) + 15) / 16 * 16;
  return bytes <= kRowCacheBytes ? size_t(bytes) : 0;
}

// Calls f(j, x_j) for the elements j of [0, n) owned by this thread, x_j in fp32, and
// copies them to `cache` when it is not null. When `row` is 16-byte aligned, the thread
// owns whole vectors of 16 / sizeof(T) elements (vector v = thread + k * kLossThreads) and
// reads each with one load; the last n % V elements are read one by one by the first
// threads. Otherwise every element is read alone (element j = thread + k * kLossThreads).
// The split depends only on n and the alignment, so the order of a thread's elements is
// fixed. The cache layout is the row's, whichever split filled it.
template <typename T, typename F>
__device__ __forceinline__ void for_row(const T* row, int64_t n, T* cache, const F& f) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t scalar_begin = 0;
  if (aligned16(row)) {
    const int64_t n_vec = n / kVec;
    for (int64_t v = threadIdx.x; v < n_vec; v += kLossThreads) {
      const uint4 raw = reinterpret_cast<const uint4*>(row)[v];
      if (cache) reinterpret_cast<uint4*>(cache)[v] = raw;
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(v * kVec + k, to_float(vals[k]));
    }
    scalar_begin = n_vec * kVec;
  }
  for (int64_t j = scalar_begin + threadIdx.x; j < n; j += kLossThreads) {
    const T raw = row[j];
    if (cache) cache[j] = raw;
    f(j, to_float(raw));
  }
}

// out[j] = f(j, x_j) for the elements of [0, n) owned by this thread, with 16-byte vector
// loads and stores when both rows are 16-byte aligned (the same split as for_row).
// `in` and `out` may be the same row: each element is read before it is written, by the
// same thread.
template <typename T, typename F>
__device__ __forceinline__ void map_row(const T* in, T* out, int64_t n, const F& f) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t scalar_begin = 0;
  if (aligned16(in) && aligned16(out)) {
    const int64_t n_vec = n / kVec;
    for (int64_t v = threadIdx.x; v < n_vec; v += kLossThreads) {
      uint4 raw = reinterpret_cast<const uint4*>(in)[v];
      T* vals = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) vals[k] = from_float<T>(f(v * kVec + k, to_float(vals[k])));
      reinterpret_cast<uint4*>(out)[v] = raw;
    }
    scalar_begin = n_vec * kVec;
  }
  for (int64_t j = scalar_begin + threadIdx.x; j < n; j += kLossThreads)
    out[j] = from_float<T>(f(j, to_float(in[j])));
}

// Sum of one float per thread over the block, in a fixed order; every thread gets it.
// `scratch` holds kLossWarps floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kLossWarps; ++w) total += scratch[w];
  return total;
}

// Block-wide merge of per-thread (max m, d = sum exp(x - m)); every thread gets the result
// (d NaN for a +inf max, lse_sum_at_max).
// `scratch` holds 2 * kLossWarps floats of shared memory. Its barriers also publish the
// row cache written before it to every thread.
__device__ __forceinline__ void block_lse(float& m, float& d, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float d2 = __shfl_xor_sync(0xffffffffu, d, offset);
    loss_math::lse_merge(m, d, m2, d2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = m;
    scratch[kLossWarps + warp] = d;
  }
  __syncthreads();
  m = scratch[0];
  d = scratch[kLossWarps];
#pragma unroll
  for (int w = 1; w < kLossWarps; ++w)
    loss_math::lse_merge(m, d, scratch[w], scratch[kLossWarps + w]);
  d = loss_math::lse_sum_at_max(m, d);
}

// Writes `value` to every element of a row of n values.
template <typename T>
__device__ __forceinline__ void fill_row(T* row, int64_t n, float value) {
  const T v = from_float<T>(value);
  for (int64_t j = threadIdx.x; j < n; j += kLossThreads) row[j] = v;
}

inline unsigned loss_grid(int64_t rows) {
  return static_cast<unsigned>(rows < int64_t(kMaxLossBlocks) ? rows : int64_t(kMaxLossBlocks));
}

// Lets `kernel` use the whole row cache (kRowCacheBytes of dynamic shared memory, above the
// default limit), once per device: the setting is per kernel and device, so later launches
// (and launches captured in a CUDA graph) make no runtime call for it. Devices beyond the
// first 64 ordinals set it at every launch.
template <auto kernel>
cudaError_t allow_row_cache() {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(kRowCacheBytes));
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_release);
  return err;
}

// Launches a row kernel over n_rows rows with `smem` bytes of row cache and returns the
// launch's error.
template <auto kernel, typename Args>
cudaError_t launch_rows(int64_t n_rows, size_t smem, cudaStream_t stream, const Args& args) {
  if (smem > kSmemWithoutOptIn) {
    const cudaError_t err = allow_row_cache<kernel>();
    if (err != cudaSuccess) return err;
  }
  kernel<<<loss_grid(n_rows), kLossThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fusedopt::cuda
