// Fused softmax cross-entropy on CUDA tensors: row loss and gradient in one launch.
//
// Math (fusedopt/math_loss.h, the one copy shared with the cpu backend), per row of C
// logits l, x = s tanh(l/s) with soft-capping:
//   lse = max + log S, S = sum_j exp(x_j - max), p_j = exp(x_j - max) / S
//   class target y: loss = s_ce ((1-eps) w_y (lse - x_y) + (eps/C)(lse sum w - sum w x))
//                          + s_z c lse^2
//                   dloss/dx_j = p_j a - (eps/C) s_ce w_j - [j == y] s_ce (1-eps) w_y
//   soft target q:  r_j = w_j ((1-eps) q_j + eps/C), loss = s_ce (lse sum r - sum r x)
//                          + s_z c lse^2,   dloss/dx_j = p_j a - s_ce r_j
//   a = s_ce (sum of the subtracted weights) + 2 s_z c lse
//   dloss/dl_j = dloss/dx_j (1 - (x_j/s)^2)
// Ignored rows: loss 0, zero gradient. A class target outside [0, C): loss NaN, gradient
// NaN, and nothing is read at the bad index. s_ce, s_z are read from `scales` (device).
//
// One block of 256 threads per row (a grid-stride loop past 2^20 rows). Pass 1 reads the
// row once with 16-byte vector loads when it is aligned (online max / sum-exp, one exp per
// element, per thread; then a fixed-order block merge) and, for rows of at most
// kCachedCols classes, keeps the capped fp32 values in shared memory; pass 2 writes the
// gradient exp(x_j - max) (a / S) - t_j from shared memory (or reads the row again, from L2
// for most rows), fp32 until the store; then one thread writes the target entry again with
// its whole fp32 term (x_y was read before pass 1, so an in-place gradient cannot have
// overwritten it). Traffic: reads N*C*b (+ N*C*b of soft targets), writes N*C*b + 4N; rows
// longer than kCachedCols are read twice from L2/DRAM.
// Flags that change the inner loop only by a uniform branch (soft-capping, smoothing,
// weights, z-loss, gradient) are runtime values: one kernel per dtype and target kind.
#include "fusedopt/cuda_losses.h"
#include "loss_block.cuh"

namespace fusedopt::cuda {
namespace {

using loss_math::shifted_exp;
using loss_math::softcap_slope;
using loss_math::softcap_value;

// fp32 values kept in shared memory: 47 KB, under the 48 KB a block may use without opting
// in, with the static scratch of the reductions
constexpr int64_t kCachedCols = 12032;

struct CeArgs {
  CrossEntropyParams p;
  const float* sum_w;  // device: sum of the class weights; nullptr: C (no weights)
  bool cached;  // the row's values stay in shared memory between the passes
};

__device__ __forceinline__ float capped(float x, float cap) {
  return cap > 0.0f ? softcap_value(x, cap) : x;
}

// out[j] = grad_of(j, x_j) over a row, x_j (soft-capped) from the shared-memory row cache
// when there is one, else read again from `in`.
template <typename T, typename G>
__device__ __forceinline__ void write_grad(const T* in, T* out, int64_t n_cols,
                                           const float* cache, float cap, const G& grad_of) {
  if (cache) {
    for (int64_t j = threadIdx.x; j < n_cols; j += kLossThreads)
      out[j] = from_float<T>(grad_of(j, cache[j]));
  } else {
    map_row(in, out, n_cols, aligned16(in) && aligned16(out),
            [&](int64_t j, float x) { return grad_of(j, capped(x, cap)); });
  }
}

template <typename T>
__global__ void __launch_bounds__(kLossThreads) class_target_kernel(const CeArgs args) {
  extern __shared__ float row_cache[];
  __shared__ float scratch[2 * kLossWarps];
  const CrossEntropyParams& p = args.p;
  const int64_t n_cols = p.n_cols;
  const float cap = p.softcap, eps = p.label_smoothing;
  const float s_ce = p.scales[0], s_z = p.scales[1];
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
    const float x_y = valid ? capped(to_float(in[y]), cap) : 0.0f;
    const float w_y = valid && p.weight ? p.weight[y] : 1.0f;
    // 2. pass 1: log-sum-exp and sum w x
    float m = -kInf, d = 0.0f, swx = 0.0f;
    for_row(in, n_cols, aligned16(in), [&](int64_t j, float x) {
      x = capped(x, cap);
      if (args.cached) row_cache[j] = x;
      loss_math::lse_fold(m, d, x);
      if (eps > 0.0f) swx += (p.weight ? p.weight[j] : 1.0f) * x;
    });
    block_lse(m, d, scratch);
    if (eps > 0.0f) swx = block_sum(swx, scratch);
    const float sum_w = args.sum_w ? *args.sum_w : float(n_cols);
    const loss_math::ClassRowCoeffs k = loss_math::class_row_coeffs(
        x_y, w_y, m, loss_math::flog(d), sum_w, swx, eps, float(n_cols), p.z_loss, s_ce, s_z);
    if (threadIdx.x == 0) p.row_loss[row] = valid ? k.loss : nan_value();
    if (out && !valid) fill_row(out, n_cols, nan_value());
    if (out && valid) {
      // 3. pass 2: the gradient, fp32 until the store
      const float coef = k.a / d;
      const auto grad_of = [&](int64_t j, float x) {
        const float t = eps > 0.0f ? k.cw * (p.weight ? p.weight[j] : 1.0f) : 0.0f;
        const float g = shifted_exp(x, m) * coef - t;
        return cap > 0.0f ? g * softcap_slope(x, cap) : g;
      };
      write_grad(in, out, n_cols, args.cached ? row_cache : nullptr, cap, grad_of);
      __syncthreads();
      // 4. the target entry again, its whole term in fp32
      if (threadIdx.x == 0) {
        const float t_y = (eps > 0.0f ? k.cw * w_y : 0.0f) + k.b;
        const float g_y = shifted_exp(x_y, m) * coef - t_y;
        out[y] = from_float<T>(cap > 0.0f ? g_y * softcap_slope(x_y, cap) : g_y);
      }
    }
    __syncthreads();  // the row cache and scratch are reused by the next row
  }
}

template <typename T>
__global__ void __launch_bounds__(kLossThreads) soft_target_kernel(const CeArgs args) {
  extern __shared__ float row_cache[];
  __shared__ float scratch[2 * kLossWarps];
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
    // 1. pass 1: log-sum-exp, sum r x, sum r
    float m = -kInf, d = 0.0f, srx = 0.0f, sr = 0.0f;
    for_row(in, n_cols, aligned16(in), [&](int64_t j, float x) {
      x = capped(x, cap);
      if (args.cached) row_cache[j] = x;
      loss_math::lse_fold(m, d, x);
      const float r = weight_of(j);
      srx += r * x;
      sr += r;
    });
    block_lse(m, d, scratch);
    srx = block_sum(srx, scratch);
    sr = block_sum(sr, scratch);
    float loss, a;
    loss_math::soft_row_coeffs(m, loss_math::flog(d), sr, srx, p.z_loss, s_ce, s_z, loss, a);
    if (threadIdx.x == 0) p.row_loss[row] = loss;
    if (out) {
      // 2. pass 2: the gradient (an in-place gradient overwrites x_j after reading it)
      const float coef = a / d;
      const auto grad_of = [&](int64_t j, float x) {
        const float g = shifted_exp(x, m) * coef - s_ce * weight_of(j);
        return cap > 0.0f ? g * softcap_slope(x, cap) : g;
      };
      write_grad(in, out, n_cols, args.cached ? row_cache : nullptr, cap, grad_of);
    }
    __syncthreads();
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
      p.n_cols < 1 || p.scales == nullptr || p.row_loss == nullptr)
    return cudaErrorInvalidValue;
  if (p.n_rows == 0) return cudaSuccess;
  // the sum of the weights is needed with smoothing only
  const bool weighted_smoothing = p.weight != nullptr && p.label_smoothing > 0.0f && !p.soft_target;
  if (weighted_smoothing && workspace == nullptr) return cudaErrorInvalidValue;
  const CeArgs args{p, weighted_smoothing ? workspace : nullptr, p.n_cols <= kCachedCols};
  if (weighted_smoothing) {
    total_weight_kernel<<<1, kLossThreads, 0, stream>>>(p.weight, p.n_cols, workspace);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const size_t smem = args.cached ? size_t(p.n_cols) * sizeof(float) : 0;
  const unsigned grid = loss_grid(p.n_rows);
  FO_DTYPE_SWITCH(p.dtype, T, [&] {
    if (p.soft_target)
      soft_target_kernel<T><<<grid, kLossThreads, smem, stream>>>(args);
    else
      class_target_kernel<T><<<grid, kLossThreads, smem, stream>>>(args);
  });
  return cudaGetLastError();
}

}  // namespace fusedopt::cuda
