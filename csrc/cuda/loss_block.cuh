// Building blocks of the CUDA loss kernels (cross_entropy.cu, focal.cu): one block of
// kLossThreads threads per row, the row walked with 16-byte vector loads where possible,
// and deterministic block reductions (warp shuffles in a fixed pattern, then the warps'
// values in warp order), so a result never depends on scheduling.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedopt/dispatch.h"
#include "fusedopt/math.h"
#include "fusedopt/params_loss.h"

namespace fusedopt::cuda {

constexpr int kLossThreads = 256;
constexpr int kLossWarps = kLossThreads / 32;
constexpr unsigned kMaxLossBlocks = 1u << 20;  // rows beyond are walked by a grid-stride loop

using loss_math::kInf;

__device__ __forceinline__ float nan_value() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ int64_t load_index(const void* target, int index_type, int64_t row) {
  switch (static_cast<IndexType>(index_type)) {
    case IndexType::kInt32: return static_cast<const int32_t*>(target)[row];
    case IndexType::kUInt8: return static_cast<const uint8_t*>(target)[row];
    default: return static_cast<const int64_t*>(target)[row];
  }
}

// Calls f(j, x_j) for the elements j of [0, n) owned by this thread, x_j in fp32. When
// `row` and every row given in `also` are 16-byte aligned, the thread owns whole vectors of
// 16 / sizeof(T) elements (vector v = thread + k * kLossThreads) and reads them with one
// load each; the last n % V elements are read one by one by the first threads. Otherwise
// every element is read alone (element j = thread + k * kLossThreads). The split depends
// only on n and the alignment, so the order of a thread's elements is fixed.
template <typename T, typename F>
__device__ __forceinline__ void for_row(const T* row, int64_t n, bool vector_ok, const F& f) {
  constexpr int kVec = 16 / sizeof(T);
  if (vector_ok) {
    const int64_t n_vec = n / kVec;
    for (int64_t v = threadIdx.x; v < n_vec; v += kLossThreads) {
      const uint4 raw = reinterpret_cast<const uint4*>(row)[v];
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(v * kVec + k, to_float(vals[k]));
    }
    for (int64_t j = n_vec * kVec + threadIdx.x; j < n; j += kLossThreads) f(j, to_float(row[j]));
  } else {
    for (int64_t j = threadIdx.x; j < n; j += kLossThreads) f(j, to_float(row[j]));
  }
}

// out[j] = f(j, x_j) for the elements of [0, n) owned by this thread, with 16-byte vector
// loads and stores when both rows are 16-byte aligned (the same split as for_row).
// `in` and `out` may be the same row: each element is read before it is written, by the
// same thread.
template <typename T, typename F>
__device__ __forceinline__ void map_row(const T* in, T* out, int64_t n, bool vector_ok,
                                        const F& f) {
  constexpr int kVec = 16 / sizeof(T);
  if (vector_ok) {
    const int64_t n_vec = n / kVec;
    for (int64_t v = threadIdx.x; v < n_vec; v += kLossThreads) {
      uint4 raw = reinterpret_cast<const uint4*>(in)[v];
      T* vals = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) vals[k] = from_float<T>(f(v * kVec + k, to_float(vals[k])));
      reinterpret_cast<uint4*>(out)[v] = raw;
    }
    for (int64_t j = n_vec * kVec + threadIdx.x; j < n; j += kLossThreads)
      out[j] = from_float<T>(f(j, to_float(in[j])));
  } else {
    for (int64_t j = threadIdx.x; j < n; j += kLossThreads)
      out[j] = from_float<T>(f(j, to_float(in[j])));
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
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

// Block-wide merge of per-thread (max m, d = sum exp(x - m)); every thread gets the result.
// `scratch` holds 2 * kLossWarps floats of shared memory.
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
  for (int w = 1; w < kLossWarps; ++w) loss_math::lse_merge(m, d, scratch[w], scratch[kLossWarps + w]);
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

}  // namespace fusedopt::cuda
