// Focal losses on CPU tensors: softmax focal (multi-class, per row) and sigmoid focal
// (binary / multi-label, per element), loss and gradient in one call each.
//
// Softmax focal (fusedopt/math_loss.h focal_terms), per row of C logits, target y,
// q_j = (1-eps)[j == y] + eps/C, L_j = log p_j, u_j = 1 - p_j = -expm1(L_j):
//   loss = -scale sum_j alpha_j q_j u_j^gamma L_j
//   v_j  = alpha_j q_j u_j^gamma (1 - gamma p_j L_j / u_j),   V = sum_j v_j
//   dloss/dx_j = scale (p_j V - v_j)
// Without smoothing only v_y is non-zero: dloss/dx_j = scale v_y (p_j - [j == y]), the
// target entry formed as -scale v_y u_y (no cancellation as p_y -> 1). The gradient is
// finite at p -> 1 for every gamma >= 0 (p L / u -> -1 there).
// Passes over a row (C b bytes): 2 reads without smoothing (lse; gradient), 3 with it
// (lse; V and the loss; gradient), the row staying in L2 between them; writes C b + 4.
// Ignored rows: loss 0, zero gradient; a target outside [0, C): NaN loss and gradient.
//
// Sigmoid focal (math_loss.h sigmoid_focal), elementwise over n values, computed in
// fixed spans of kSigmoidFocalSpan elements, one OpenMP task each: reads 2 n b (logits,
// targets), writes n b (gradient) and n b (per-element loss) or 4 bytes per span (the
// span's partial sum, summed lane by lane in a fixed order, times scale).
#include <cstring>

#include "fusedopt/cpu_losses.h"
#include "loss_lanes.h"

namespace fusedopt::cpu {
namespace {

using loss_math::log_prob;

constexpr float kNaN = __builtin_nanf("");

// Softmax focal terms of kLanes classes from column j (the first n real, the others
// contribute 0): p_j, v_j, and the loss terms added to loss_acc when it is given.
// The other lanes hold -inf (p = 0, u = 1): a finite fill above the row max would give
// p > 1, u < 0 and a NaN u^gamma that alpha_q = 0 cannot cancel.
template <bool kAlpha, typename T>
FO_LANES_INLINE void smoothed_terms(const T* in, const float* alpha, int64_t j, int64_t n,
                                    int64_t y, float row_max, float log_sum, float q_on,
                                    float q_off, float gamma, float* p_j, float* v,
                                    float* loss_acc) {
  float x[kLanes];
  if (n == kLanes)
    load_lanes<false>(in + j, 0.0f, x);
  else
    load_tail<false>(in + j, n, 0.0f, -loss_math::kInf, x);
  const int target_lane = lane_of(y, j);
  for (int l = 0; l < kLanes; ++l) {
    const float a = kAlpha ? (l < n ? alpha[j + l] : 0.0f) : (l < n ? 1.0f : 0.0f);
    const float aq = a * (l == target_lane ? q_on : q_off);
    const auto t = loss_math::focal_terms(log_prob(x[l], row_max, log_sum), aq, gamma);
    p_j[l] = t.p;
    v[l] = t.v;
    if (loss_acc) loss_acc[l] += t.loss;
  }
}

template <typename T, bool kSmooth, bool kAlpha>
FO_LOSS_CLONES void focal_row(const FocalParams& p, int64_t row, int64_t y, float scale) {
  const int64_t n_cols = p.n_cols;
  const float gamma = p.gamma, eps = p.label_smoothing;
  const float* alpha = p.alpha;
  const T* in = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  T* out = p.grad ? static_cast<T*>(p.grad) + row * p.grad_row_stride : nullptr;
  const int64_t full = n_cols - n_cols % kLanes;
  const int64_t rest = n_cols - full;
  const bool valid = y >= 0 && y < n_cols;
  if (!valid) {
    p.row_loss[row] = kNaN;
    if (out) fill_row(out, n_cols, kNaN);
    return;
  }
  // 1. pass 1: log-sum-exp
  LaneLse lse;
  float x[kLanes];
  for (int64_t j = 0; j < full; j += kLanes) {
    load_lanes<false>(in + j, 0.0f, x);
    lse.fold(x);
  }
  if (rest) {
    load_tail<false>(in + full, rest, 0.0f, -loss_math::kInf, x);
    lse.fold(x);
  }
  float row_max, sum;
  lse.finish(row_max, sum);
  const float log_sum = loss_math::flog(sum);
  float g[kLanes];
  if (!kSmooth) {
    // 2. the target term alone; pass 2: the gradient scale v_y (p_j - [j == y])
    const float log_p_y = log_prob(to_float(in[y]), row_max, log_sum);
    const auto t = loss_math::focal_terms(log_p_y, kAlpha ? alpha[y] : 1.0f, gamma);
    p.row_loss[row] = -scale * t.loss;
    if (!out) return;
    const float k = scale * t.v;
    const float coef = k / sum;
    const float target_grad = k * loss_math::fexpm1(log_p_y);  // -k u_y
    for (int64_t j = 0; j < n_cols; j += kLanes) {
      const int64_t n = j < full ? kLanes : rest;
      if (n == kLanes)
        load_lanes<false>(in + j, 0.0f, x);
      else
        load_tail<false>(in + j, n, 0.0f, 0.0f, x);
      const int target_lane = lane_of(y, j);
      for (int l = 0; l < kLanes; ++l)
        g[l] = l == target_lane ? target_grad : loss_math::shifted_exp(x[l], row_max) * coef;
      if (n == kLanes)
        store_lanes(out + j, g);
      else
        store_tail(out + j, n, g);
    }
    return;
  }
  // 2. pass 2 (smoothing): the loss and V = sum v; pass 3 recomputes v for the gradient
  const float q_off = eps / float(n_cols), q_on = 1.0f - eps + eps / float(n_cols);
  float p_j[kLanes], v[kLanes];
  float loss_acc[kLanes] = {}, v_acc[kLanes] = {};
  for (int64_t j = 0; j < n_cols; j += kLanes) {
    smoothed_terms<kAlpha>(in, alpha, j, j < full ? kLanes : rest, y, row_max, log_sum, q_on,
                           q_off, gamma, p_j, v, loss_acc);
    for (int l = 0; l < kLanes; ++l) v_acc[l] += v[l];
  }
  p.row_loss[row] = -scale * lane_sum(loss_acc);
  if (!out) return;
  const float big_v = lane_sum(v_acc);
  for (int64_t j = 0; j < n_cols; j += kLanes) {
    const int64_t n = j < full ? kLanes : rest;
    smoothed_terms<kAlpha>(in, alpha, j, n, y, row_max, log_sum, q_on, q_off, gamma, p_j, v,
                           nullptr);
    for (int l = 0; l < kLanes; ++l) g[l] = scale * (p_j[l] * big_v - v[l]);
    if (n == kLanes)
      store_lanes(out + j, g);
    else
      store_tail(out + j, n, g);
  }
}

template <typename T, bool kReduce, bool kGrad>
FO_LOSS_CLONES void sigmoid_focal_span(const SigmoidFocalParams& p, int64_t span, float scale) {
  const int64_t begin = span * kSigmoidFocalSpan;
  const int64_t end = begin + kSigmoidFocalSpan < p.n ? begin + kSigmoidFocalSpan : p.n;
  const T* xs = static_cast<const T*>(p.logits);
  const T* ts = static_cast<const T*>(p.target);
  T* loss_out = static_cast<T*>(p.loss);
  T* grad_out = static_cast<T*>(p.grad);
  const float alpha = p.alpha, gamma = p.gamma, eps = p.label_smoothing;
  float x[kLanes], t[kLanes], loss[kLanes], grad[kLanes], acc[kLanes] = {};
  for (int64_t i = begin; i < end; i += kLanes) {
    const int64_t n = end - i < kLanes ? end - i : kLanes;
    if (n == kLanes) {
      load_lanes<false>(xs + i, 0.0f, x);
      load_lanes<false>(ts + i, 0.0f, t);
    } else {
      load_tail<false>(xs + i, n, 0.0f, 0.0f, x);
      load_tail<false>(ts + i, n, 0.0f, 0.0f, t);
    }
    for (int l = 0; l < kLanes; ++l) {
      const auto r = loss_math::sigmoid_focal(x[l], t[l], alpha, gamma, eps);
      loss[l] = kReduce ? (l < n ? r.loss : 0.0f) : scale * r.loss;
      grad[l] = scale * r.grad;
    }
    if (kReduce)
      for (int l = 0; l < kLanes; ++l) acc[l] += loss[l];
    if (n == kLanes) {
      if (!kReduce) store_lanes(loss_out + i, loss);
      if (kGrad) store_lanes(grad_out + i, grad);
    } else {
      if (!kReduce) store_tail(loss_out + i, n, loss);
      if (kGrad) store_tail(grad_out + i, n, grad);
    }
  }
  if (kReduce) static_cast<float*>(p.loss)[span] = scale * lane_sum(acc);
}

}  // namespace

int focal_loss_fwd(const FocalParams& p, int num_threads) {
  if (!valid_dtype(p.dtype)) return kLossBadDType;
  if (!valid_index_type(p.index_type)) return kLossBadIndexType;
  if (p.n_rows < 0 || p.n_cols < 1) return kLossBadShape;
  const float scale = p.scales[0];
  FO_DTYPE_SWITCH(p.dtype, T, [&] {
    FO_BOOL_SWITCH(p.label_smoothing > 0.0f, kSmooth, [&] {
      FO_BOOL_SWITCH(p.alpha != nullptr, kAlpha, [&] {
        parallel_for(p.n_rows, p.n_rows * p.n_cols, num_threads, [&](int64_t row) {
          const int64_t y = load_index(p.target, p.index_type, row);
          if (y == p.ignore_index) {
            p.row_loss[row] = 0.0f;
            if (p.grad)
              std::memset(static_cast<T*>(p.grad) + row * p.grad_row_stride, 0,
                          sizeof(T) * size_t(p.n_cols));
            return;
          }
          focal_row<T, kSmooth, kAlpha>(p, row, y, scale);
        });
      });
    });
  });
  return kLossOk;
}

int sigmoid_focal_loss_fwd(const SigmoidFocalParams& p, int num_threads) {
  if (!valid_dtype(p.dtype)) return kLossBadDType;
  if (p.n < 0) return kLossBadShape;
  const float scale = p.scales[0];
  const int64_t spans = sigmoid_focal_partials(p.n);
  FO_DTYPE_SWITCH(p.dtype, T, [&] {
    FO_BOOL_SWITCH(p.reduce, kReduce, [&] {
      FO_BOOL_SWITCH(p.grad != nullptr, kGrad, [&] {
        parallel_for(spans, p.n * 8, num_threads, [&](int64_t span) {
          sigmoid_focal_span<T, kReduce, kGrad>(p, span, scale);
        });
      });
    });
  });
  return kLossOk;
}

}  // namespace fusedopt::cpu
