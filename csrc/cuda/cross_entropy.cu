// Fused softmax cross-entropy on CUDA tensors: row loss and gradient in one launch.
//
// Math (fusedopt/math_loss.h, the one copy shared with the cpu backend), per row of C
// logits l, x = s tanh(l/s) with soft-capping:
//   M = max_j x_j, S = sum_j exp(x_j - M), lse = M + log S, p_j = exp(x_j - M) / S
//   class target y: loss = s_ce ((1-eps) w_y ((M - x_y) + log S)
//                                + (eps/C)(log S sum w + sum_j w_j (M - x_j))) + s_z c lse^2
//                   dloss/dx_j = p_j a - (eps/C) s_ce w_j - [j == y] s_ce (1-eps) w_y
//   soft target q:  r_j = w_j ((1-eps) q_j + eps/C),
//                   loss = s_ce (log S sum r + sum_j r_j (M - x_j)) + s_z c lse^2,
//                   dloss/dx_j = p_j a - s_ce r_j
//   a = s_ce (sum of the subtracted weights) + 2 s_z c lse,
//   dloss/dl_j = dloss/dx_j (1 - (x_j/s)^2)
// The gap sums sum w (M - x) add terms >= 0: no cancellation, also for logits of 1e30.
// Ignored rows: loss 0, zero gradient. A class target outside [0, C): loss NaN, gradient
// NaN, and nothing is read at the bad index. s_ce, s_z are read from `scales` (device).
//
// One block of 256 threads per row (loss_block.cuh; a grid-stride loop past 2^20 rows).
// 1. x_y and w_y are read first (an in-place gradient cannot have overwritten them).
// 2. Pass 1 reads the row once, with 16-byte vector loads when it is aligned: per thread an
//    online max / sum-exp (one exp per element) and, for soft targets, sum r; then a
//    fixed-order block merge. Rows of at most kRowCacheBytes (32,768 bf16/fp16 or 16,384
//    fp32 logits) are copied, in their own dtype, into shared memory on the way.
// 3. Pass 2 writes the gradient exp(x_j - max) (a / S) - t_j, fp32 until the store, reading
//    the row from shared memory (or again from memory, mostly L2, for longer rows), and
//    adds up the gap sum (smoothing, soft targets), which needs M; without a gradient it
//    only adds up that sum. The row loss is written after it.
// 4. One thread writes the target entry again with its whole fp32 term.
// Traffic: reads N*C*b (2 N*C*b for rows over the cache limit; + 2 N*C*b of soft targets),
// writes N*C*b + 4N, b = bytes per logit.
// Template flags: soft-capping and (class targets) smoothing, which change the inner loops;
// weights, z-loss and the gradient are runtime values (uniform branches or per-row scalars).
#include "fusedopt/cuda_losses.h"
#include "loss_block.cuh"

namespace fusedopt::cuda {
namespace {

using loss_math::shifted_exp;
using loss_math::softcap_slope;

struct CeArgs {
  CrossEntropyParams p;
  const float* sum_w;  // device: sum of the class weights; nullptr: C (no weights)
  bool cached;         // the row is kept in the row cache between the passes
};

template <bool kCapped>
__device__ __forceinline__ float capped(float x, float cap) {
  if constexpr (kCapped) return loss_math::softcap_value(x, cap);
  return x;
}

// dloss/dl from dloss/dx (x the capped logit)
template <bool kCapped>
__device__ __forceinline__ float through_cap(float g, float x, float cap) {
  if constexpr (kCapped) return g * softcap_slope(x, cap);
  return g;
}

template <typename T, bool kCapped, bool kSmoothing>
__global__ void __launch_bounds__(kLossThreads) class_target_kernel(const CeArgs args) {
  __shared__ float scratch[2 * kLossWarps];
  T* const cache = args.cached ? row_cache<T>() : nullptr;
  const CrossEntropyParams& p = args.p;
  const int64_t n_cols = p.n_cols;
  const float cap = p.softcap, eps = kSmoothing ? p.label_smoothing : 0.0f;
  const float s_ce = p.scales[0], s_z = p.scales[1];
  const float sum_w = args.sum_w ? *args.sum_w : float(n_cols);
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* in = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* out = p.grad ? static_cast<T*>(p.grad) + row * p.grad_row_stride : nullptr;
    const int64_t y = load_index(p.target, p.index_type, row);
    if (y == p.ignore_index) {
      if (threadIdx.x == 0) p.row_loss[row] = 0.0f;
      if (out) fill_row(out, n_cols, 0.0f);
      continue;
    }
    // 1. the target logit and weight, read before anything is written
    const bool valid = y >= 0 && y < n_cols;
    const float x_y = valid ? capped<kCapped>(to_float(in[y]), cap) : 0.0f;
    const float w_y = valid && p.weight ? p.weight[y] : 1.0f;
    // 2. pass 1: log-sum-exp
    float m = -kInf, d = 0.0f;
    for_row(in, n_cols, cache, [&](int64_t, float x) {
      loss_math::lse_fold(m, d, capped<kCapped>(x, cap));
    });
    block_lse(m, d, scratch);
    const loss_math::ClassRowCoeffs k = loss_math::class_row_coeffs(
        x_y, w_y, m, loss_math::flog(d), sum_w, eps, float(n_cols), p.z_loss, s_ce, s_z);
    if (!valid) {
      if (threadIdx.x == 0) p.row_loss[row] = nan_value();
      if (out) fill_row(out, n_cols, nan_value());
      __syncthreads();  // the row cache is reused by the next row
      continue;
    }
    // 3. pass 2: the gradient, fp32 until the store, and the gap sum of smoothing
    float gap = 0.0f;
    const auto gap_of = [&](int64_t j, float x) {
      if constexpr (kSmoothing)
        gap += loss_math::smoothing_gap(x, p.weight ? p.weight[j] : 1.0f, m);
    };
    const float coef = k.a / d;
    if (out) {
      map_row(cache ? cache : in, out, n_cols, [&](int64_t j, float x) {
        x = capped<kCapped>(x, cap);
        gap_of(j, x);
        float g = shifted_exp(x, m) * coef;
        if constexpr (kSmoothing) g -= k.cw * (p.weight ? p.weight[j] : 1.0f);
        return through_cap<kCapped>(g, x, cap);
      });
    } else if (kSmoothing) {
      for_row(cache ? cache : in, n_cols, static_cast<T*>(nullptr),
              [&](int64_t j, float x) { gap_of(j, capped<kCapped>(x, cap)); });
    }
    if constexpr (kSmoothing) gap = block_sum(gap, scratch);
    if (threadIdx.x == 0) p.row_loss[row] = loss_math::row_loss_with_gap(k.loss, k.cw, gap);
    if (out) {
      __syncthreads();
      // 4. the target entry again, its whole term in fp32
      if (threadIdx.x == 0) {
        const float t_y = (kSmoothing ? k.cw * w_y : 0.0f) + k.b;
        out[y] = from_float<T>(through_cap<kCapped>(shifted_exp(x_y, m) * coef - t_y, x_y, cap));
      }
    }
    __syncthreads();  // the row cache and scratch are reused by the next row
  }
}

template <typename T, bool kCapped>
__global__ void __launch_bounds__(kLossThreads) soft_target_kernel(const CeArgs args) {
  __shared__ float scratch[2 * kLossWarps];
  T* const cache = args.cached ? row_cache<T>() : nullptr;
  const CrossEntropyParams& p = args.p;
  const int64_t n_cols = p.n_cols;
  const float cap = p.softcap, eps = p.label_smoothing, inv_cols = 1.0f / float(n_cols);
  const float s_ce = p.scales[0], s_z = p.scales[1];
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* in = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    const T* q = static_cast<const T*>(p.target) + row * p.target_row_stride;
    T* out = p.grad ? static_cast<T*>(p.grad) + row * p.grad_row_stride : nullptr;
    const auto weight_of = [&](int64_t j) {
      return loss_math::soft_target_weight(to_float(q[j]), p.weight ? p.weight[j] : 1.0f, eps,
                                           inv_cols);
    };
    // 1. pass 1: log-sum-exp and sum r
    float m = -kInf, d = 0.0f, sr = 0.0f;
    for_row(in, n_cols, cache, [&](int64_t j, float x) {
      loss_math::lse_fold(m, d, capped<kCapped>(x, cap));
      sr += weight_of(j);
    });
    block_lse(m, d, scratch);
    sr = block_sum(sr, scratch);
    float loss, a;
    loss_math::soft_row_coeffs(m, loss_math::flog(d), sr, p.z_loss, s_ce, s_z, loss, a);
    // 2. pass 2: the gradient (an in-place gradient overwrites x_j after reading it) and
    // the gap sum sum r (M - x)
    float gap = 0.0f;
    if (out) {
      const float coef = a / d;
      map_row(cache ? cache : in, out, n_cols, [&](int64_t j, float x) {
        x = capped<kCapped>(x, cap);
        const float r = weight_of(j);
        gap += loss_math::smoothing_gap(x, r, m);
        return through_cap<kCapped>(shifted_exp(x, m) * coef - s_ce * r, x, cap);
      });
    } else {
      for_row(cache ? cache : in, n_cols, static_cast<T*>(nullptr), [&](int64_t j, float x) {
        gap += loss_math::smoothing_gap(capped<kCapped>(x, cap), weight_of(j), m);
      });
    }
    gap = block_sum(gap, scratch);
    if (threadIdx.x == 0) p.row_loss[row] = loss_math::row_loss_with_gap(loss, s_ce, gap);
    __syncthreads();  // the row cache and scratch are reused by the next row
  }
}

// sum_j w_j in a fixed order, by one block, before the rows (read once per call).
__global__ void __launch_bounds__(kLossThreads)
    total_weight_kernel(const float* weight, int64_t n_cols, float* out) {
  __shared__ float scratch[kLossWarps];
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < n_cols; j += kLossThreads) acc += weight[j];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *out = acc;
}

bool valid_code(int code) { return code >= 0 && code <= 2; }

}  // namespace

cudaError_t cross_entropy_fwd(const CrossEntropyParams& p, float* workspace, cudaStream_t stream) {
  if (!valid_code(p.dtype) || (!p.soft_target && !valid_code(p.index_type)) || p.n_rows < 0 ||
      p.n_cols < 1 || p.scales == nullptr || p.row_loss == nullptr || p.logits == nullptr ||
      p.target == nullptr)
    return cudaErrorInvalidValue;
  if (p.n_rows == 0) return cudaSuccess;
  // the sum of the weights is needed with smoothing only
  const bool weighted_smoothing = p.weight != nullptr && p.label_smoothing > 0.0f && !p.soft_target;
  if (weighted_smoothing && workspace == nullptr) return cudaErrorInvalidValue;
  if (weighted_smoothing) {
    total_weight_kernel<<<1, kLossThreads, 0, stream>>>(p.weight, p.n_cols, workspace);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return FO_DTYPE_SWITCH(p.dtype, T, [&] {
    const size_t smem = row_cache_bytes<T>(p.n_cols);
    const CeArgs args{p, weighted_smoothing ? workspace : nullptr, smem > 0};
    return FO_BOOL_SWITCH(p.softcap > 0.0f, kCapped, [&] {
      if (p.soft_target)
        return launch_rows<soft_target_kernel<T, kCapped>>(p.n_rows, smem, stream, args);
      return FO_BOOL_SWITCH(p.label_smoothing > 0.0f, kSmoothing, [&] {
        return launch_rows<class_target_kernel<T, kCapped, kSmoothing>>(p.n_rows, smem, stream,
                                                                         args);
      });
    });
  });
}

}  // namespace fusedopt::cuda
