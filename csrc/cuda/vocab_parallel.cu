// Vocab-parallel cross-entropy on CUDA tensors: the two per-shard passes over one rank's
// columns of logits split over the classes (docs/architecture.md, "Vocab-parallel
// cross-entropy"); the ops layer combines the ranks' row statistics with two all-reduces.
//
// Math (fusedopt/math_vocab_parallel.h and math_loss.h, the copies the cpu kernel
// csrc/cpu/vocab_parallel.cpp uses), per row, over the local columns j of a rank holding
// the classes [offset, offset + C) of num_classes, x = s tanh(l/s) with soft-capping:
//   row stats  = [max_j x_j, sum_j exp(x_j - max), x_y if y is local else 0,
//                 sum_j w_j (max - x_j) (smoothing, else 0)]
//   soft target: [max, sum exp, sum_j r_j (max - x_j), sum_j r_j],
//                r_j = w_j ((1-eps) q_j + eps/num_classes)
//   The gap sums are kept per thread relative to the thread's running max (gap_fold),
//   moved to the row's max (gap_at_max) and then summed over the block: every addend
//   >= 0, nothing cancels, also for logits of 1e30.
//   gradient from coefs = [row_max, log_sum, a, b, c] (the full row, combined):
//     dx_j = exp(x_j - row_max) a / exp(log_sum) - t_j,   dl_j = dx_j (1 - (x_j/s)^2)
//     class: t_j = c w_j + b [offset + j == y];  soft: t_j = c r_j
// Ignored rows: stats (-inf, 0, 0, 0) and a zero gradient row; their logits are not read.
// A class target this rank does not hold (another rank's, or outside [0, num_classes)) is
// never used as an index; the ops layer gives a bad one a NaN `a`, hence a NaN row.
//
// One block of 256 threads per row (loss_block.cuh; a grid-stride loop past 2^20 rows),
// 16-byte vector loads and stores for aligned rows, element accesses otherwise.
// Row stats: one read of the row -- per thread an online max / sum-exp (one exp per
// element) and the weighted sums, then fixed-order block merges; thread 0 reads the target
// logit and writes the row's four values.
// Gradient: one read and one write of the row, each element read and written by the same
// thread (so an in-place gradient is safe); the target column's whole term, p_y a - t_y, is
// formed in fp32 by the thread that owns it and rounded once. No reduction, no barrier.
// Memory traffic, b bytes per logit: row stats read N*C*b and write 16N; the gradient reads
// N*C*b and 20N of coefficients, and writes N*C*b; soft targets add N*C*b to each pass;
// plus one target index per row and the weight slice (from L2). No scratch memory, no
// float atomics: the bits do not depend on scheduling.
#include "fusedopt/cuda_vocab_parallel.h"
#include "fusedopt/math_vocab_parallel.h"
#include "loss_block.cuh"

namespace fusedopt::cuda {
namespace {

using vocab_math::GradRow;
using vocab_math::grad_value;

template <bool kCapped>
__device__ __forceinline__ float capped(float x, float cap) {
  if constexpr (kCapped) return loss_math::softcap_value(x, cap);
  return x;
}

__device__ __forceinline__ float weight_at(const float* weight, int64_t j) {
  return weight ? weight[j] : 1.0f;
}

template <typename T>
__device__ __forceinline__ const T* row_at(const void* base, int64_t stride, int64_t row) {
  return static_cast<const T*>(base) + row * stride;
}

template <typename T, bool kCapped, bool kSmoothing>
__global__ void __launch_bounds__(kLossThreads) class_stats_kernel(const VocabParallelParams p) {
  __shared__ float scratch[2 * kLossWarps];
  const float cap = p.softcap;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    float* out = p.stats + row * kVocabStatsWidth;
    const int64_t y = load_index(p.target, p.index_type, row);
    if (y == p.ignore_index) {  // the same branch for the whole block
      if (threadIdx.x == 0) vocab_math::empty_stats(out);
      continue;
    }
    const T* in = row_at<T>(p.logits, p.logits_row_stride, row);
    float m = -kInf, d = 0.0f, gap = 0.0f, sum_w = 0.0f;
    for_row(in, p.n_cols, static_cast<T*>(nullptr), [&](int64_t j, float x) {
      x = capped<kCapped>(x, cap);
      if constexpr (kSmoothing) loss_math::gap_fold(gap, sum_w, m, x, weight_at(p.weight, j));
      loss_math::lse_fold(m, d, x);
    });
    const float thread_max = m;
    block_lse(m, d, scratch);
    if constexpr (kSmoothing)
      gap = block_sum(loss_math::gap_at_max(gap, sum_w, thread_max, m), scratch);
    if (threadIdx.x == 0) {
      const int64_t local = vocab_math::owned_column(y, p.class_offset, p.n_cols);
      out[0] = m;
      out[1] = d;
      out[2] = local >= 0 ? capped<kCapped>(to_float(in[local]), cap) : 0.0f;
      out[3] = kSmoothing ? gap : 0.0f;
    }
  }
}

template <typename T, bool kCapped>
__global__ void __launch_bounds__(kLossThreads) soft_stats_kernel(const VocabParallelParams p) {
  __shared__ float scratch[2 * kLossWarps];
  const float cap = p.softcap, eps = p.label_smoothing;
  const float inv_classes = 1.0f / float(p.num_classes);
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* in = row_at<T>(p.logits, p.logits_row_stride, row);
    const T* q = row_at<T>(p.target, p.target_row_stride, row);
    float m = -kInf, d = 0.0f, gap = 0.0f, sr = 0.0f;
    for_row(in, p.n_cols, static_cast<T*>(nullptr), [&](int64_t j, float x) {
      x = capped<kCapped>(x, cap);
      const float r = loss_math::soft_target_weight(to_float(q[j]), weight_at(p.weight, j),
                                                    eps, inv_classes);
      loss_math::gap_fold(gap, sr, m, x, r);
      loss_math::lse_fold(m, d, x);
    });
    const float thread_max = m;
    block_lse(m, d, scratch);
    gap = block_sum(loss_math::gap_at_max(gap, sr, thread_max, m), scratch);
    sr = block_sum(sr, scratch);
    if (threadIdx.x == 0) {
      float* out = p.stats + row * kVocabStatsWidth;
      out[0] = m;
      out[1] = d;
      out[2] = gap;
      out[3] = sr;
    }
  }
}

template <typename T, bool kCapped, bool kSmoothing>
__global__ void __launch_bounds__(kLossThreads) class_grad_kernel(const VocabParallelParams p) {
  const float cap = p.softcap;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    T* out = static_cast<T*>(p.grad) + row * p.grad_row_stride;
    const int64_t y = load_index(p.target, p.index_type, row);
    if (y == p.ignore_index) {
      fill_row(out, p.n_cols, 0.0f);
      continue;
    }
    const GradRow k = vocab_math::grad_row(p.coefs + row * kVocabCoefsWidth);
    const int64_t local = vocab_math::owned_column(y, p.class_offset, p.n_cols);
    map_row(row_at<T>(p.logits, p.logits_row_stride, row), out, p.n_cols,
            [&](int64_t j, float x) {
              x = capped<kCapped>(x, cap);
              float t = kSmoothing ? k.c * weight_at(p.weight, j) : 0.0f;
              if (j == local) t += k.b;  // the target column: its whole term in fp32
              return grad_value<kCapped>(x, k, t, cap);
            });
  }
}

template <typename T, bool kCapped>
__global__ void __launch_bounds__(kLossThreads) soft_grad_kernel(const VocabParallelParams p) {
  const float cap = p.softcap, eps = p.label_smoothing;
  const float inv_classes = 1.0f / float(p.num_classes);
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* q = row_at<T>(p.target, p.target_row_stride, row);
    const GradRow k = vocab_math::grad_row(p.coefs + row * kVocabCoefsWidth);
    map_row(row_at<T>(p.logits, p.logits_row_stride, row),
            static_cast<T*>(p.grad) + row * p.grad_row_stride, p.n_cols,
            [&](int64_t j, float x) {
              x = capped<kCapped>(x, cap);
              const float r = loss_math::soft_target_weight(
                  to_float(q[j]), weight_at(p.weight, j), eps, inv_classes);
              return grad_value<kCapped>(x, k, k.c * r, cap);
            });
  }
}

}  // namespace

cudaError_t vocab_parallel_row_stats(const VocabParallelParams& p, cudaStream_t stream) {
  if (check_vocab_parallel(p, VocabParallelPass::kRowStats) != kLossOk)
    return cudaErrorInvalidValue;
  if (p.n_rows == 0) return cudaSuccess;
  return FO_DTYPE_SWITCH(p.dtype, T, [&] {
    return FO_BOOL_SWITCH(p.softcap > 0.0f, kCapped, [&] {
      if (p.soft_target) return launch_rows<soft_stats_kernel<T, kCapped>>(p.n_rows, 0, stream, p);
      return FO_BOOL_SWITCH(p.label_smoothing > 0.0f, kSmoothing, [&] {
        return launch_rows<class_stats_kernel<T, kCapped, kSmoothing>>(p.n_rows, 0, stream, p);
      });
    });
  });
}

cudaError_t vocab_parallel_grad(const VocabParallelParams& p, cudaStream_t stream) {
  if (check_vocab_parallel(p, VocabParallelPass::kGrad) != kLossOk) return cudaErrorInvalidValue;
  if (p.n_rows == 0) return cudaSuccess;
  return FO_DTYPE_SWITCH(p.dtype, T, [&] {
    return FO_BOOL_SWITCH(p.softcap > 0.0f, kCapped, [&] {
      if (p.soft_target) return launch_rows<soft_grad_kernel<T, kCapped>>(p.n_rows, 0, stream, p);
      return FO_BOOL_SWITCH(p.label_smoothing > 0.0f, kSmoothing, [&] {
        return launch_rows<class_grad_kernel<T, kCapped, kSmoothing>>(p.n_rows, 0, stream, p);
      });
    });
  });
}

}  // namespace fusedopt::cuda
