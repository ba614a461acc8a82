// Focal losses on CUDA tensors -- softmax focal (per row) and sigmoid focal (per element),
// loss and gradient in one launch each -- and scale_grad, the backward of a loss with a
// scalar grad_output.
//
// Softmax focal (fusedopt/math_loss.h focal_terms, shared with the cpu backend), per row
// of C logits, target y, q_j = (1-eps)[j == y] + eps/C, L_j = log p_j, u_j = 1 - p_j:
//   loss = -scale sum_j alpha_j q_j u_j^gamma L_j
//   v_j  = alpha_j q_j u_j^gamma (1 - gamma p_j L_j / u_j),   V = sum_j v_j
//   dloss/dx_j = scale (p_j V - v_j)
// Without smoothing only v_y is non-zero: dloss/dx_j = scale v_y (p_j - [j == y]), the
// target entry formed as -scale v_y u_y. Ignored rows: loss 0, zero gradient; a target
// outside [0, C): NaN loss and gradient, nothing read at the bad index.
// One block of 256 threads per row (loss_block.cuh): pass 1 log-sum-exp (vector loads when
// aligned), copying rows of at most kRowCacheBytes into shared memory; with smoothing
// pass 2 sums V and the loss (fixed-order block sums); the last pass writes the gradient.
// The later passes read the row cache (longer rows: memory again, mostly L2).
// Traffic: N*C*b read (2 or, with smoothing, 3 N*C*b for rows over the cache limit),
// N*C*b written, 4 bytes of loss per row; b = bytes per logit.
//
// Sigmoid focal (math_loss.h sigmoid_focal), elementwise: one block per span of
// kSigmoidFocalSpan elements (params_loss.h), the same spans as the cpu backend, so the
// reduced loss is one partial per span (fixed-order block sum) added in span order by the
// caller. 16-byte vector loads and stores when every tensor starts 16-byte aligned.
// Reads 2 n b, writes n b of gradient and n b of loss (or 4 bytes per span).
//
// scale_grad: grad *= scale in fp32, one rounding, 16-byte vectors when aligned; a block
// sees scale == 1 and returns without touching memory (a 'mean'/'sum' loss's usual
// backward costs nothing). Reads and writes n b otherwise.
#include "fusedopt/cuda_losses.h"
#include "loss_block.cuh"

namespace fusedopt::cuda {
namespace {

using loss_math::focal_terms;
using loss_math::log_prob;

struct FocalArgs {
  FocalParams p;
  bool cached;  // the row is kept in the row cache between the passes
};

template <typename T>
__global__ void __launch_bounds__(kLossThreads) focal_kernel(const FocalArgs args) {
  __shared__ float scratch[2 * kLossWarps];
  T* const cache = args.cached ? row_cache<T>() : nullptr;
  const FocalParams& p = args.p;
  const int64_t n_cols = p.n_cols;
  const float gamma = p.gamma, eps = p.label_smoothing, scale = p.scales[0];
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* in = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* out = p.grad ? static_cast<T*>(p.grad) + row * p.grad_row_stride : nullptr;
    const int64_t y = load_index(p.target, p.index_type, row);
    if (y == p.ignore_index || y < 0 || y >= n_cols) {
      const float value = y == p.ignore_index ? 0.0f : nan_value();
      if (threadIdx.x == 0) p.row_loss[row] = value;
      if (out) fill_row(out, n_cols, value);
      continue;
    }
    const float x_y = to_float(in[y]);
    // 1. pass 1: log-sum-exp (and the row cache)
    float m = -kInf, d = 0.0f;
    for_row(in, n_cols, cache, [&](int64_t, float x) { loss_math::lse_fold(m, d, x); });
    block_lse(m, d, scratch);
    const float log_sum = loss_math::flog(d);
    const T* src = cache ? cache : in;
    if (eps == 0.0f) {
      // 2. the target term alone; pass 2: the gradient scale v_y (p_j - [j == y])
      const float log_p_y = log_prob(x_y, m, log_sum);
      const auto t = focal_terms(log_p_y, p.alpha ? p.alpha[y] : 1.0f, gamma);
      if (threadIdx.x == 0) p.row_loss[row] = -scale * t.loss;
      if (out) {
        const float k = scale * t.v;
        const float coef = k / d;
        const float target_grad = k * loss_math::fexpm1(log_p_y);  // -k u_y
        map_row(src, out, n_cols, [&](int64_t j, float x) {
          return j == y ? target_grad : loss_math::shifted_exp(x, m) * coef;
        });
      }
    } else {
      // 2. pass 2: the loss and V = sum v; pass 3 recomputes v for the gradient
      const float q_off = eps / float(n_cols), q_on = 1.0f - eps + eps / float(n_cols);
      const auto terms = [&](int64_t j, float x) {
        const float a = p.alpha ? p.alpha[j] : 1.0f;
        return focal_terms(log_prob(x, m, log_sum), a * (j == y ? q_on : q_off), gamma);
      };
      float loss = 0.0f, big_v = 0.0f;
      for_row(src, n_cols, static_cast<T*>(nullptr), [&](int64_t j, float x) {
        const auto t = terms(j, x);
        loss += t.loss;
        big_v += t.v;
      });
      loss = block_sum(loss, scratch);
      big_v = block_sum(big_v, scratch);
      if (threadIdx.x == 0) p.row_loss[row] = -scale * loss;
      if (out) {
        map_row(src, out, n_cols, [&](int64_t j, float x) {
          const auto t = terms(j, x);
          return scale * (t.p * big_v - t.v);
        });
      }
    }
    __syncthreads();  // the row cache and scratch are reused by the next row
  }
}

// One element of the sigmoid focal loss: stores its scaled gradient and loss through
// `grad` and `loss` (registers; the caller writes them out when wanted) and returns its
// unscaled loss for the span's sum.
template <typename T>
__device__ __forceinline__ float sigmoid_focal_one(const SigmoidFocalParams& p, float scale,
                                                   T x, T t, T* grad, T* loss) {
  const auto r = loss_math::sigmoid_focal(to_float(x), to_float(t), p.alpha, p.gamma,
                                          p.label_smoothing);
  *grad = from_float<T>(scale * r.grad);
  *loss = from_float<T>(scale * r.loss);
  return r.loss;
}

template <typename T>
__global__ void __launch_bounds__(kLossThreads) sigmoid_focal_kernel(const SigmoidFocalParams p) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ float scratch[kLossWarps];
  const float scale = p.scales[0];
  // every span starts a multiple of 16 bytes after the tensors' starts
  const bool vector_ok = aligned16(p.logits) && aligned16(p.target) &&
                         (p.grad == nullptr || aligned16(p.grad)) &&
                         (p.reduce || aligned16(p.loss));
  const int64_t spans = (p.n + kSigmoidFocalSpan - 1) / kSigmoidFocalSpan;
  for (int64_t span = blockIdx.x; span < spans; span += gridDim.x) {
    const int64_t begin = span * kSigmoidFocalSpan;
    const int64_t len = p.n - begin < kSigmoidFocalSpan ? p.n - begin : kSigmoidFocalSpan;
    const T* x = static_cast<const T*>(p.logits) + begin;
    const T* t = static_cast<const T*>(p.target) + begin;
    T* grad = p.grad ? static_cast<T*>(p.grad) + begin : nullptr;
    T* loss = p.reduce ? nullptr : static_cast<T*>(p.loss) + begin;
    float acc = 0.0f;
    int64_t scalar_begin = 0;
    if (vector_ok) {
      const int64_t n_vec = len / kVec;
      for (int64_t v = threadIdx.x; v < n_vec; v += kLossThreads) {
        const uint4 x_raw = reinterpret_cast<const uint4*>(x)[v];
        const uint4 t_raw = reinterpret_cast<const uint4*>(t)[v];
        uint4 grad_raw, loss_raw;
        const T* xs = reinterpret_cast<const T*>(&x_raw);
        const T* ts = reinterpret_cast<const T*>(&t_raw);
        T* gs = reinterpret_cast<T*>(&grad_raw);
        T* ls = reinterpret_cast<T*>(&loss_raw);
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          acc += sigmoid_focal_one(p, scale, xs[k], ts[k], gs + k, ls + k);
        if (grad) reinterpret_cast<uint4*>(grad)[v] = grad_raw;
        if (loss) reinterpret_cast<uint4*>(loss)[v] = loss_raw;
      }
      scalar_begin = n_vec * kVec;
    }
    for (int64_t i = scalar_begin + threadIdx.x; i < len; i += kLossThreads) {
      T g, l;
      acc += sigmoid_focal_one(p, scale, x[i], t[i], &g, &l);
      if (grad) grad[i] = g;
      if (loss) loss[i] = l;
    }
    if (p.reduce) {
      acc = block_sum(acc, scratch);
      if (threadIdx.x == 0) static_cast<float*>(p.loss)[span] = scale * acc;
    }
  }
}

// grad *= scale over spans of kScaleSpan elements (16-byte vectors when grad is aligned:
// every span starts a multiple of 16 bytes after it).
constexpr int64_t kScaleSpan = int64_t(kLossThreads) * 16;

template <typename T>
__global__ void __launch_bounds__(kLossThreads)
    scale_kernel(T* grad, int64_t n, const float* scale) {
  const float s = *scale;
  if (s == 1.0f) return;
  const int64_t spans = (n + kScaleSpan - 1) / kScaleSpan;
  for (int64_t span = blockIdx.x; span < spans; span += gridDim.x) {
    const int64_t begin = span * kScaleSpan;
    const int64_t len = n - begin < kScaleSpan ? n - begin : kScaleSpan;
    map_row(grad + begin, grad + begin, len, [&](int64_t, float g) { return g * s; });
  }
}

bool valid_code(int code) { return code >= 0 && code <= 2; }

}  // namespace

cudaError_t focal_loss_fwd(const FocalParams& p, cudaStream_t stream) {
  if (!valid_code(p.dtype) || !valid_code(p.index_type) || p.n_rows < 0 || p.n_cols < 1 ||
      p.scales == nullptr || p.row_loss == nullptr || p.logits == nullptr || p.target == nullptr)
    return cudaErrorInvalidValue;
  if (p.n_rows == 0) return cudaSuccess;
  return FO_DTYPE_SWITCH(p.dtype, T, [&] {
    const size_t smem = row_cache_bytes<T>(p.n_cols);
    return launch_rows<focal_kernel<T>>(p.n_rows, smem, stream, FocalArgs{p, smem > 0});
  });
}

cudaError_t sigmoid_focal_loss_fwd(const SigmoidFocalParams& p, cudaStream_t stream) {
  if (!valid_code(p.dtype) || p.n < 0 || p.scales == nullptr || p.loss == nullptr ||
      p.logits == nullptr || p.target == nullptr)
    return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  FO_DTYPE_SWITCH(p.dtype, T, [&] {
    sigmoid_focal_kernel<T><<<loss_grid(sigmoid_focal_partials(p.n)), kLossThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t scale_grad(void* grad, int64_t n, int dtype, const float* scale, cudaStream_t stream) {
  if (!valid_code(dtype) || n < 0 || scale == nullptr) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const unsigned grid = loss_grid((n + kScaleSpan - 1) / kScaleSpan);
  FO_DTYPE_SWITCH(dtype, T, [&] {
    scale_kernel<T><<<grid, kLossThreads, 0, stream>>>(static_cast<T*>(grad), n, scale);
  });
  return cudaGetLastError();
}

}  // namespace fusedopt::cuda
