// Fused softmax cross-entropy on CPU tensors: row loss and gradient in one call.
//
// Math (fusedopt/math_loss.h), per row of C logits l, x = s tanh(l/s) with soft-capping:
//   M = max_j x_j, S = sum_j exp(x_j - M), lse = M + log S, p_j = exp(x_j - M) / S
//   class target y: loss = s_ce ((1-eps) w_y ((M - x_y) + log S)
//                                + (eps/C)(log S sum w + sum_j w_j (M - x_j))) + s_z c lse^2
//                   dloss/dx_j = p_j a - (eps/C) s_ce w_j - [j == y] s_ce (1-eps) w_y
//   soft target q:  r_j = w_j ((1-eps) q_j + eps/C),
//                   loss = s_ce (log S sum r + sum_j r_j (M - x_j)) + s_z c lse^2,
//                   dloss/dx_j = p_j a - s_ce r_j
//   a = s_ce (sum of the subtracted weights) + 2 s_z c lse
//   dloss/dl_j = dloss/dx_j (1 - (x_j/s)^2)
// The gap sums sum w (M - x) add terms >= 0 (no cancellation, also for logits of 1e30);
// they need M, so they are added up in pass 2, with the gradient.
// Ignored rows: loss 0, zero gradient. A class target outside [0, C): loss NaN, gradient
// NaN, and nothing is read at the bad index.
//
// Each row is one task of an OpenMP loop (static schedule). Pass 1 streams the row once
// (per-lane online max / sum-exp with one exp per element; soft targets: sum r); pass 2
// streams it again and writes the gradient exp(x_j - max) (a / S) - t_j, formed in fp32
// and rounded once at the store, adding up the gap sum with smoothing or soft targets
// (without a gradient, pass 2 only adds that sum); then the target entry is written again
// with its whole fp32 term. A row of up to ~100k fp32 logits stays in the core's L2 cache
// between the passes, so the memory traffic is: reads N*C*b (+ N*C*b of soft targets),
// writes N*C*b (gradient) + 4N (row losses), b = bytes per logit; class weights (4C) are
// read from cache. No temporary buffer is allocated.
#include <type_traits>

#include "fusedopt/cpu_losses.h"
#include "loss_lanes.h"

namespace fusedopt::cpu {
namespace {

using loss_math::ClassRowCoeffs;
using loss_math::shifted_exp;
using loss_math::softcap_slope;

constexpr float kNaN = __builtin_nanf("");

// Adds the gap terms w_j (max - x_j) of kLanes classes from column j (the first n real).
template <int kSmooth>
FO_LANES_INLINE void class_gap_lanes(const float* x, const float* w, int64_t n, float row_max,
                                     float* gap) {
  for (int l = 0; l < kLanes; ++l) {
    const float wl = kSmooth == 2 ? (l < n ? w[l] : 0.0f) : 1.0f;
    const float term = loss_math::smoothing_gap(x[l], wl, row_max);
    gap[l] += l < n ? term : 0.0f;
  }
}

// dloss/dx of kLanes classes starting at column j (only the first n are meaningful):
// p a - t with p a = exp(x - max) coef, t = cw w_j (kSmooth == 2) or cw (kSmooth == 1).
// The target's own term b is added after the pass (step 4 of class_target_row).
// With smoothing, the lanes' gap terms w_j (max - x_j) are added to `gap`.
template <int kSmooth, bool kCap>
FO_LANES_INLINE void class_grad_lanes(const float* x, const float* w, int64_t n,
                                      const ClassRowCoeffs& k, float row_max, float coef,
                                      float cap, float* g, float* gap) {
  for (int l = 0; l < kLanes; ++l) {
    float t = kSmooth == 1 ? k.cw : 0.0f;
    if (kSmooth == 2) t = l < n ? k.cw * w[l] : 0.0f;
    float v = shifted_exp(x[l], row_max) * coef - t;
    if (kCap) v *= softcap_slope(x[l], cap);
    g[l] = v;
  }
  if (kSmooth) class_gap_lanes<kSmooth>(x, w, n, row_max, gap);
}

// kSmooth: 0 no smoothing, 1 smoothing without class weights, 2 with class weights.
template <typename T, bool kCap, int kSmooth>
FO_LOSS_CLONES void class_target_row(const CrossEntropyParams& p, int64_t row, int64_t y,
                                     float sum_w, float s_ce, float s_z) {
  const int64_t n_cols = p.n_cols;
  const float cap = p.softcap;
  const float* weight = p.weight;
  const T* in = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  T* out = p.grad ? static_cast<T*>(p.grad) + row * p.grad_row_stride : nullptr;
  const int64_t full = n_cols - n_cols % kLanes;
  const int64_t rest = n_cols - full;
  // 1. the target logit and weight (read only when y is a class)
  const bool valid = y >= 0 && y < n_cols;
  float x_y = 0.0f, w_y = 1.0f;
  if (valid) {
    x_y = to_float(in[y]);
    if (kCap) x_y = loss_math::softcap_value(x_y, cap);
    if (weight) w_y = weight[y];
  }
  // 2. pass 1: per-lane log-sum-exp
  LaneLse lse;
  float x[kLanes];
  for (int64_t j = 0; j < full; j += kLanes) {
    load_lanes<kCap>(in + j, cap, x);
    lse.fold(x);
  }
  if (rest) {
    load_tail<kCap>(in + full, rest, cap, -loss_math::kInf, x);
    lse.fold(x);
  }
  float row_max, sum;
  lse.finish(row_max, sum);
  const ClassRowCoeffs k = loss_math::class_row_coeffs(
      x_y, w_y, row_max, loss_math::flog(sum), sum_w, p.label_smoothing, float(n_cols),
      p.z_loss, s_ce, s_z);
  if (!valid) {
    p.row_loss[row] = kNaN;
    if (out) fill_row(out, n_cols, kNaN);
    return;
  }
  // 3. pass 2: the gradient, fp32 until the store, and the gap sum of smoothing
  float gap[kLanes] = {};
  if (!out) {
    if (kSmooth)
      for (int64_t j = 0; j < n_cols; j += kLanes) {
        const int64_t n = j < full ? kLanes : rest;
        load_tail<kCap>(in + j, n, cap, 0.0f, x);
        class_gap_lanes<kSmooth>(x, at(weight, j), n, row_max, gap);
      }
    p.row_loss[row] = loss_math::row_loss_with_gap(k.loss, k.cw, lane_sum(gap));
    return;
  }
  const float coef = k.a / sum;
  float g[kLanes];
  for (int64_t j = 0; j < full; j += kLanes) {
    load_lanes<kCap>(in + j, cap, x);
    class_grad_lanes<kSmooth, kCap>(x, at(weight, j), kLanes, k, row_max, coef, cap, g, gap);
    store_lanes(out + j, g);
  }
  if (rest) {
    load_tail<kCap>(in + full, rest, cap, 0.0f, x);
    class_grad_lanes<kSmooth, kCap>(x, at(weight, full), rest, k, row_max, coef, cap, g, gap);
    store_tail(out + full, rest, g);
  }
  p.row_loss[row] = kSmooth ? loss_math::row_loss_with_gap(k.loss, k.cw, lane_sum(gap)) : k.loss;
  // 4. the target class again, its whole term in fp32 (x_y was read before pass 2, so an
  // in-place gradient cannot have overwritten it)
  const float t_y = (kSmooth == 1 ? k.cw : kSmooth == 2 ? k.cw * w_y : 0.0f) + k.b;
  float g_y = shifted_exp(x_y, row_max) * coef - t_y;
  if (kCap) g_y *= softcap_slope(x_y, cap);
  out[y] = from_float<T>(g_y);
}

// r_j = w_j ((1-eps) q_j + eps/C) of kLanes classes from column j (0 past the first n).
template <bool kWeighted, typename T>
FO_LANES_INLINE void soft_weights(const T* q, const float* w, int64_t n, float eps, float inv_cols,
                                  float* r) {
  load_tail<false>(q, n, 0.0f, 0.0f, r);
  for (int l = 0; l < kLanes; ++l) {
    const float wl = kWeighted ? (l < n ? w[l] : 0.0f) : (l < n ? 1.0f : 0.0f);
    r[l] = loss_math::soft_target_weight(r[l], wl, eps, inv_cols);
  }
}

// kLanes logits and target weights r from column j (the first n real, x = 0 and r = 0
// in the other lanes).
template <bool kCap, bool kWeighted, typename T>
FO_LANES_INLINE void soft_lanes(const T* in, const T* q, const float* weight, int64_t j,
                                int64_t n, float cap, float eps, float inv_cols, float* x,
                                float* r) {
  if (n == kLanes) {
    load_lanes<kCap>(in + j, cap, x);
    soft_weights<kWeighted>(q + j, at(weight, j), kLanes, eps, inv_cols, r);
  } else {
    load_tail<kCap>(in + j, n, cap, 0.0f, x);
    soft_weights<kWeighted>(q + j, at(weight, j), n, eps, inv_cols, r);
  }
}

// Adds the gap terms r_j (max - x_j) of the first n of kLanes classes to `gap`.
FO_LANES_INLINE void soft_gap_lanes(const float* x, const float* r, int64_t n, float row_max,
                                    float* gap) {
  for (int l = 0; l < kLanes; ++l) {
    const float term = loss_math::smoothing_gap(x[l], r[l], row_max);
    gap[l] += l < n ? term : 0.0f;
  }
}

template <typename T, bool kCap, bool kWeighted>
FO_LOSS_CLONES void soft_target_row(const CrossEntropyParams& p, int64_t row, float s_ce,
                                    float s_z) {
  const int64_t n_cols = p.n_cols;
  const float cap = p.softcap, eps = p.label_smoothing, inv_cols = 1.0f / float(n_cols);
  const float* weight = p.weight;
  const T* in = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const T* q = static_cast<const T*>(p.target) + row * p.target_row_stride;
  T* out = p.grad ? static_cast<T*>(p.grad) + row * p.grad_row_stride : nullptr;
  const int64_t full = n_cols - n_cols % kLanes;
  const int64_t rest = n_cols - full;
  float x[kLanes], r[kLanes];
  // 1. pass 1: log-sum-exp and sum r
  LaneLse lse;
  float sr[kLanes] = {};
  for (int64_t j = 0; j < full; j += kLanes) {
    load_lanes<kCap>(in + j, cap, x);
    soft_weights<kWeighted>(q + j, at(weight, j), kLanes, eps, inv_cols, r);
    lse.fold(x);
    for (int l = 0; l < kLanes; ++l) sr[l] += r[l];
  }
  if (rest) {
    load_tail<kCap>(in + full, rest, cap, -loss_math::kInf, x);
    soft_weights<kWeighted>(q + full, at(weight, full), rest, eps, inv_cols, r);
    lse.fold(x);
    for (int l = 0; l < kLanes; ++l) sr[l] += r[l];
  }
  float row_max, sum, loss, a;
  lse.finish(row_max, sum);
  loss_math::soft_row_coeffs(row_max, loss_math::flog(sum), lane_sum(sr), p.z_loss, s_ce, s_z,
                             loss, a);
  // 2. pass 2: the gradient and the gap sum sum r (max - x)
  const float coef = a / sum;
  float g[kLanes], gap[kLanes] = {};
  for (int64_t j = 0; j < n_cols; j += kLanes) {
    const int64_t n = j < full ? kLanes : rest;
    soft_lanes<kCap, kWeighted>(in, q, weight, j, n, cap, eps, inv_cols, x, r);
    soft_gap_lanes(x, r, n, row_max, gap);
    if (!out) continue;
    for (int l = 0; l < kLanes; ++l) {
      g[l] = shifted_exp(x[l], row_max) * coef - s_ce * r[l];
      if (kCap) g[l] *= softcap_slope(x[l], cap);
    }
    if (n == kLanes)
      store_lanes(out + j, g);
    else
      store_tail(out + j, n, g);
  }
  p.row_loss[row] = loss_math::row_loss_with_gap(loss, s_ce, lane_sum(gap));
}

// sum_j w_j (C without weights) in a fixed order.
float total_weight(const float* weight, int64_t n_cols) {
  if (!weight) return float(n_cols);
  float acc[kLanes] = {};
  for (int64_t j = 0; j < n_cols; ++j) acc[j % kLanes] += weight[j];
  return lane_sum(acc);
}

template <typename T, bool kCap>
void run_class_targets(const CrossEntropyParams& p, int num_threads) {
  const float s_ce = p.scales[0], s_z = p.scales[1];
  const float sum_w = total_weight(p.weight, p.n_cols);
  const int smooth = p.label_smoothing > 0.0f ? (p.weight ? 2 : 1) : 0;
  auto row_fn = [&](auto smooth_tag) {
    constexpr int kSmooth = decltype(smooth_tag)::value;
    parallel_for(p.n_rows, p.n_rows * p.n_cols, num_threads, [&](int64_t row) {
      const int64_t y = load_index(p.target, p.index_type, row);
      if (y == p.ignore_index) {
        p.row_loss[row] = 0.0f;
        if (p.grad)
          std::memset(static_cast<T*>(p.grad) + row * p.grad_row_stride, 0,
                      sizeof(T) * size_t(p.n_cols));
        return;
      }
      class_target_row<T, kCap, kSmooth>(p, row, y, sum_w, s_ce, s_z);
    });
  };
  if (smooth == 0) row_fn(std::integral_constant<int, 0>{});
  if (smooth == 1) row_fn(std::integral_constant<int, 1>{});
  if (smooth == 2) row_fn(std::integral_constant<int, 2>{});
}

template <typename T, bool kCap>
void run_soft_targets(const CrossEntropyParams& p, int num_threads) {
  const float s_ce = p.scales[0], s_z = p.scales[1];
  FO_BOOL_SWITCH(p.weight != nullptr, kWeighted, [&] {
    parallel_for(p.n_rows, p.n_rows * p.n_cols, num_threads, [&](int64_t row) {
      soft_target_row<T, kCap, kWeighted>(p, row, s_ce, s_z);
    });
  });
}

}  // namespace

int cross_entropy_fwd(const CrossEntropyParams& p, int num_threads) {
  if (!valid_dtype(p.dtype)) return kLossBadDType;
  if (!p.soft_target && !valid_index_type(p.index_type)) return kLossBadIndexType;
  if (p.n_rows < 0 || p.n_cols < 1) return kLossBadShape;
  FO_DTYPE_SWITCH(p.dtype, T, [&] {
    FO_BOOL_SWITCH(p.softcap > 0.0f, kCap, [&] {
      if (p.soft_target)
        run_soft_targets<T, kCap>(p, num_threads);
      else
        run_class_targets<T, kCap>(p, num_threads);
    });
  });
  return kLossOk;
}

}  // namespace fusedopt::cpu
