// The generic multi-tensor launcher of the CUDA optimizer kernels (adam.cu, sgd.cu,
// l2norm.cu).
//
// The host chunk planner (fusedopt/multi_tensor.h, shared with the cpu backend) cuts the
// tensors into chunks of `chunk_size` elements and groups them into launches of at most
// kMaxTensors tensor slots and kMaxChunks chunks. Each launch gets its whole table -- the
// addresses of every list for its slots, the element counts, and per chunk its slot and
// first element -- BY VALUE as the kernel argument (a __grid_constant__ parameter, read from
// the constant bank: no device allocation, no host-to-device copy, nothing to free, and
// safe to capture in a CUDA graph). The table is 6-11 KB: kernel parameters above the
// classic 4 KB need CUDA 12.1+ and a Volta or newer GPU; we build for sm_80/sm_90 with
// CUDA 12.1+ only (setup.py).
//
// One block runs one chunk. `Op` is a functor called by every thread of the block as
// op(table, slot, chunk, start, length); it walks [start, start + length) of the tensors of
// `slot` (for_each_group below). All offsets are 64-bit. Layout and limits:
// docs/cuda_optim.md.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedopt/dispatch.h"
#include "fusedopt/multi_tensor.h"

namespace fusedopt::cuda {

constexpr int kMaxTensors = 96;          // tensor slots per launch
constexpr int kMaxChunks = 512;          // chunks (= blocks) per launch
constexpr int64_t kChunkSize = 65536;    // elements per chunk
constexpr int kBlockThreads = 512;       // threads per block
constexpr int kIlp = 4;                  // elements per group (one vector access)

template <int kLists>
struct TensorTable {
  void* ptr[kLists][kMaxTensors];   // list l, slot s
  int64_t numel[kMaxTensors];
  int64_t chunk_start[kMaxChunks];  // first element of each chunk inside its tensor
  int64_t chunk_size;
  int64_t first_chunk;              // plan-wide number of this launch's chunk 0
  uint8_t chunk_slot[kMaxChunks];
};

template <int kLists, typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_kernel(const __grid_constant__ TensorTable<kLists> table, const Op op) {
  const int chunk = static_cast<int>(blockIdx.x);
  const int slot = table.chunk_slot[chunk];
  const int64_t start = table.chunk_start[chunk];
  const int64_t rest = table.numel[slot] - start;
  op(table, slot, chunk, start, rest < table.chunk_size ? rest : table.chunk_size);
}

// True when every launch of `plan` fits the fixed-size table.
inline bool plan_fits(const MultiTensorPlan& plan) {
  for (const LaunchRange& l : plan.launches)
    if (l.slot_end - l.slot_begin > kMaxTensors || l.chunk_end - l.chunk_begin > kMaxChunks)
      return false;
  return true;
}

// Launches `op` over every chunk of `plan`, one launch per planned launch, in order.
// fill(table, slot, tensor) writes table.ptr[l][slot] for every list l of global tensor
// `tensor`. Returns the first launch error (cudaErrorInvalidValue for a plan that does not
// fit the table, before anything runs).
template <int kLists, typename Fill, typename Op>
cudaError_t launch_multi_tensor(const MultiTensorPlan& plan, const int64_t* numel,
                                const Fill& fill, const Op& op, cudaStream_t stream) {
  static_assert(sizeof(TensorTable<kLists>) + sizeof(Op) <= 32764,
                "kernel parameters above the 32 KB limit of CUDA 12.1+");
  if (!plan_fits(plan)) return cudaErrorInvalidValue;
  for (const LaunchRange& l : plan.launches) {
    TensorTable<kLists> table{};
    table.chunk_size = plan.chunk_size;
    table.first_chunk = l.chunk_begin;
    for (int64_t s = l.slot_begin; s < l.slot_end; ++s) {
      const int slot = static_cast<int>(s - l.slot_begin);
      const int32_t t = plan.slot_tensor[s];
      table.numel[slot] = numel[t];
      fill(table, slot, t);
    }
    for (int64_t c = l.chunk_begin; c < l.chunk_end; ++c) {
      table.chunk_slot[c - l.chunk_begin] = static_cast<uint8_t>(plan.chunk_slot[c]);
      table.chunk_start[c - l.chunk_begin] = plan.chunk_start[c];
    }
    const unsigned blocks = static_cast<unsigned>(l.chunk_end - l.chunk_begin);
    multi_tensor_kernel<kLists, Op><<<blocks, kBlockThreads, 0, stream>>>(table, op);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------- element groups
//
// A thread walks its chunk of n elements in groups of kIlp consecutive elements: group g
// is [kIlp*g, kIlp*g + kIlp), thread j takes groups j, j + kBlockThreads, ... The same
// assignment whatever the alignment, so a reduction adds in the same order either way.
// A group is "whole" when it lies inside the chunk and every list of the chunk is aligned
// to kIlp elements: then each list is read and written with one vector access (16 bytes
// for fp32, 8 for bf16/fp16); otherwise element by element, lanes past n masked (loaded as
// 0, never stored).

template <typename T>
struct alignas(kIlp * sizeof(T)) Group {
  T lane[kIlp];
};

// True when `ptr` (a list's first element of the chunk) allows vector accesses.
template <typename T>
__device__ __forceinline__ bool group_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (kIlp * sizeof(T)) == 0;
}

template <typename T>
__device__ __forceinline__ void load_group(const T* x, int64_t first, int64_t n, bool whole,
                                           float (&v)[kIlp]) {
  if (whole) {
    const Group<T> g = *reinterpret_cast<const Group<T>*>(x + first);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) v[k] = to_float(g.lane[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k) v[k] = first + k < n ? to_float(x[first + k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_group(T* x, int64_t first, int64_t n, bool whole,
                                            const float (&v)[kIlp]) {
  if (whole) {
    Group<T> g;
#pragma unroll
    for (int k = 0; k < kIlp; ++k) g.lane[k] = from_float<T>(v[k]);
    *reinterpret_cast<Group<T>*>(x + first) = g;
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k)
      if (first + k < n) x[first + k] = from_float<T>(v[k]);
  }
}

// Calls body(first, whole) for every group of this thread in a chunk of n elements.
template <typename Body>
__device__ __forceinline__ void for_each_group(int64_t n, bool aligned, const Body& body) {
  for (int64_t first = int64_t(threadIdx.x) * kIlp; first < n;
       first += int64_t(kBlockThreads) * kIlp)
    body(first, aligned && first + kIlp <= n);
}

// A device scalar (nullptr = absent) read by the kernel.
__device__ __forceinline__ float scalar_or(const float* ptr, float fallback) {
  return ptr ? *ptr : fallback;
}

// Per-tensor counters (Adam step counters, SGD "buffer initialised" flags) are written by a
// launch of their own after every update launch of the step, so that every block of a
// tensor -- in whichever launch its chunks fall -- reads the value from before the step.
// counter = set_one ? 1 : counter + 1, unless *skip > 0.
cudaError_t update_counters(float* const* counters, int64_t n, bool set_one, const float* skip,
                            cudaStream_t stream);

}  // namespace fusedopt::cuda
