// Vocab-parallel cross-entropy on CPU tensors: the two per-shard passes over one rank's
// columns of logits split over the classes (docs/architecture.md, "Vocab-parallel
// cross-entropy"); the ops layer combines the ranks' row statistics with two all-reduces.
//
// Math (fusedopt/math_vocab_parallel.h, shared with csrc/cuda/vocab_parallel.cu), per row,
// over the local columns j of a rank holding the classes [offset, offset + C) of
// num_classes, x = s tanh(l/s) with soft-capping:
//   row stats  = [max_j x_j, sum_j exp(x_j - max), x_y if y is local else 0,
//                 sum_j w_j (max - x_j) (smoothing, else 0)]
//   soft target: [max, sum exp, sum_j r_j (max - x_j), sum_j r_j],
//                r_j = w_j ((1-eps) q_j + eps/num_classes)
//   The gap sums are kept per lane relative to the lane's running max (gap_fold) and moved
//   to the shard's max at the end (gap_at_max): every addend >= 0, nothing cancels, also
//   for logits of 1e30; the ops layer moves them on to the row max of all shards.
//   gradient from coefs = [row_max, log_sum, a, b, c] (the full row, combined):
//     dx_j = exp(x_j - row_max) a / exp(log_sum) - t_j,   dl_j = dx_j (1 - (x_j/s)^2)
//     class: t_j = c w_j + b [offset + j == y];  soft: t_j = c r_j
// Ignored rows: stats (-inf, 0, 0, 0) and a zero gradient row, nothing read.
//
// Each row is one task of an OpenMP loop (static schedule) in kLanes-wide lanes, as in
// cross_entropy.cpp, so results never depend on the thread count or the ISA clone.
// Memory traffic, b bytes per logit: row stats read N*C*b and write 16N; the gradient
// reads N*C*b more and writes N*C*b (soft targets: + N*C*b per pass); coefficients 20N.
// No temporary buffer. The target logit is read before the gradient pass, so an in-place
// gradient cannot have overwritten it.
#include <cstring>
#include <type_traits>

#include "fusedopt/cpu_vocab_parallel.h"
#include "fusedopt/math_vocab_parallel.h"
#include "loss_lanes.h"

namespace fusedopt::cpu {
namespace {

using vocab_math::grad_value;

// r_j = w_j ((1-eps) q_j + eps/num_classes) of kLanes classes from column j (0 past n).
template <bool kWeighted, typename T>
FO_LANES_INLINE void soft_weights(const T* q, const float* w, int64_t n, float eps,
                                  float inv_classes, float* r) {
  load_tail<false>(q, n, 0.0f, 0.0f, r);
  for (int l = 0; l < kLanes; ++l) {
    const float wl = kWeighted ? (l < n ? w[l] : 0.0f) : (l < n ? 1.0f : 0.0f);
    r[l] = loss_math::soft_target_weight(r[l], wl, eps, inv_classes);
  }
}

// Per-lane gap sums g = sum w (m - x) relative to the lane maxima m of a LaneLse, and
// their weights w; fold before the LaneLse folds the same values.
struct LaneGap {
  float g[kLanes] = {};
  float w[kLanes] = {};

  // The first n lanes of x with weights `weight` (nullptr: 1 each).
  FO_LANES_INLINE void fold(const LaneLse& lse, const float* x, const float* weight,
                            int64_t n) {
    for (int l = 0; l < kLanes; ++l) {
      float gl = g[l], wl = w[l];
      loss_math::gap_fold(gl, wl, lse.m[l], x[l], l < n ? (weight ? weight[l] : 1.0f) : 0.0f);
      g[l] = l < n ? gl : g[l];
      w[l] = l < n ? wl : w[l];
    }
  }
  // The first n lanes of x with weights r (kLanes values).
  FO_LANES_INLINE void fold_weights(const LaneLse& lse, const float* x, const float* r,
                                    int64_t n) {
    for (int l = 0; l < kLanes; ++l) {
      float gl = g[l], wl = w[l];
      loss_math::gap_fold(gl, wl, lse.m[l], x[l], r[l]);
      g[l] = l < n ? gl : g[l];
      w[l] = l < n ? wl : w[l];
    }
  }
  // The lanes moved to the row max and added in order.
  FO_LANES_INLINE float finish(const LaneLse& lse, float row_max) const {
    float s = 0.0f;
    for (int l = 0; l < kLanes; ++l) s += loss_math::gap_at_max(g[l], w[l], lse.m[l], row_max);
    return s;
  }
};

template <typename T>
const T* row_of(const void* base, int64_t stride, int64_t row) {
  return static_cast<const T*>(base) + row * stride;
}

// kSmooth: 0 no smoothing, 1 smoothing without class weights, 2 with class weights.
template <typename T, bool kCap, int kSmooth>
FO_LOSS_CLONES void class_stats_row(const VocabParallelParams& p, int64_t row, int64_t y) {
  const int64_t n_cols = p.n_cols;
  const int64_t local = vocab_math::owned_column(y, p.class_offset, n_cols);
  const float cap = p.softcap;
  const T* in = row_of<T>(p.logits, p.logits_row_stride, row);
  const int64_t full = n_cols - n_cols % kLanes, rest = n_cols - full;
  float x_y = 0.0f;
  if (local >= 0) {
    x_y = to_float(in[local]);
    if (kCap) x_y = loss_math::softcap_value(x_y, cap);
  }
  LaneLse lse;
  LaneGap gap;
  float x[kLanes];
  for (int64_t j = 0; j < full; j += kLanes) {
    load_lanes<kCap>(in + j, cap, x);
    if (kSmooth) gap.fold(lse, x, kSmooth == 2 ? p.weight + j : nullptr, kLanes);
    lse.fold(x);
  }
  if (rest) {
    load_tail<kCap>(in + full, rest, cap, -loss_math::kInf, x);
    if (kSmooth) gap.fold(lse, x, kSmooth == 2 ? p.weight + full : nullptr, rest);
    lse.fold(x);
  }
  float* out = p.stats + row * kVocabStatsWidth;
  lse.finish(out[0], out[1]);
  out[2] = x_y;
  out[3] = kSmooth ? gap.finish(lse, out[0]) : 0.0f;
}

template <typename T, bool kCap, bool kWeighted>
FO_LOSS_CLONES void soft_stats_row(const VocabParallelParams& p, int64_t row) {
  const int64_t n_cols = p.n_cols;
  const float cap = p.softcap, eps = p.label_smoothing, inv = 1.0f / float(p.num_classes);
  const T* in = row_of<T>(p.logits, p.logits_row_stride, row);
  const T* q = row_of<T>(p.target, p.target_row_stride, row);
  const int64_t full = n_cols - n_cols % kLanes, rest = n_cols - full;
  LaneLse lse;
  LaneGap gap;
  float x[kLanes], r[kLanes];
  for (int64_t j = 0; j < full + (rest ? kLanes : 0); j += kLanes) {
    const int64_t n = j < full ? kLanes : rest;
    if (n == kLanes)
      load_lanes<kCap>(in + j, cap, x);
    else
      load_tail<kCap>(in + j, n, cap, -loss_math::kInf, x);
    soft_weights<kWeighted>(q + j, at(p.weight, j), n, eps, inv, r);
    gap.fold_weights(lse, x, r, n);
    lse.fold(x);
  }
  float* out = p.stats + row * kVocabStatsWidth;
  lse.finish(out[0], out[1]);
  out[2] = gap.finish(lse, out[0]);
  out[3] = lane_sum(gap.w);
}

template <typename T, bool kCap, int kSmooth>
FO_LOSS_CLONES void class_grad_row(const VocabParallelParams& p, int64_t row, int64_t y) {
  const int64_t n_cols = p.n_cols;
  const int64_t local = vocab_math::owned_column(y, p.class_offset, n_cols);
  const bool owned = local >= 0;
  const float cap = p.softcap;
  const vocab_math::GradRow k = vocab_math::grad_row(p.coefs + row * kVocabCoefsWidth);
  const float c = k.c;
  const T* in = row_of<T>(p.logits, p.logits_row_stride, row);
  T* out = static_cast<T*>(p.grad) + row * p.grad_row_stride;
  const float x_y = owned ? (kCap ? loss_math::softcap_value(to_float(in[local]), cap)
                                  : to_float(in[local]))
                          : 0.0f;
  const int64_t full = n_cols - n_cols % kLanes, rest = n_cols - full;
  float x[kLanes], g[kLanes];
  for (int64_t j = 0; j < full + (rest ? kLanes : 0); j += kLanes) {
    const int64_t n = j < full ? kLanes : rest;
    if (n == kLanes)
      load_lanes<kCap>(in + j, cap, x);
    else
      load_tail<kCap>(in + j, n, cap, 0.0f, x);
    for (int l = 0; l < kLanes; ++l) {
      float t = kSmooth == 1 ? c : 0.0f;
      if (kSmooth == 2) t = l < n ? c * p.weight[j + l] : 0.0f;
      g[l] = grad_value<kCap>(x[l], k, t, cap);
    }
    if (n == kLanes)
      store_lanes(out + j, g);
    else
      store_tail(out + j, n, g);
  }
  if (owned) {  // the target column again, its whole term in fp32
    const float t_y = (kSmooth == 1 ? c : kSmooth == 2 ? c * p.weight[local] : 0.0f) + k.b;
    out[local] = from_float<T>(grad_value<kCap>(x_y, k, t_y, cap));
  }
}

template <typename T, bool kCap, bool kWeighted>
FO_LOSS_CLONES void soft_grad_row(const VocabParallelParams& p, int64_t row) {
  const int64_t n_cols = p.n_cols;
  const float cap = p.softcap, eps = p.label_smoothing, inv = 1.0f / float(p.num_classes);
  const vocab_math::GradRow k = vocab_math::grad_row(p.coefs + row * kVocabCoefsWidth);
  const T* in = row_of<T>(p.logits, p.logits_row_stride, row);
  const T* q = row_of<T>(p.target, p.target_row_stride, row);
  T* out = static_cast<T*>(p.grad) + row * p.grad_row_stride;
  const int64_t full = n_cols - n_cols % kLanes, rest = n_cols - full;
  float x[kLanes], r[kLanes], g[kLanes];
  for (int64_t j = 0; j < full + (rest ? kLanes : 0); j += kLanes) {
    const int64_t n = j < full ? kLanes : rest;
    if (n == kLanes)
      load_lanes<kCap>(in + j, cap, x);
    else
      load_tail<kCap>(in + j, n, cap, 0.0f, x);
    soft_weights<kWeighted>(q + j, at(p.weight, j), n, eps, inv, r);
    for (int l = 0; l < kLanes; ++l) g[l] = grad_value<kCap>(x[l], k, k.c * r[l], cap);
    if (n == kLanes)
      store_lanes(out + j, g);
    else
      store_tail(out + j, n, g);
  }
}

// body(row, y) for the rows whose class target is not ignore_index; ignored(row) otherwise.
template <typename Body, typename Ignored>
void class_rows(const VocabParallelParams& p, int num_threads, const Body& body,
                const Ignored& ignored) {
  parallel_for(p.n_rows, p.n_rows * p.n_cols, num_threads, [&](int64_t row) {
    const int64_t y = load_index(p.target, p.index_type, row);
    if (y == p.ignore_index)
      ignored(row);
    else
      body(row, y);
  });
}

// f(T, kCap, kSmooth or kWeighted as an integral_constant) for the params' flags.
template <typename F>
void dispatch(const VocabParallelParams& p, const F& f) {
  FO_DTYPE_SWITCH(p.dtype, T, [&] {
    FO_BOOL_SWITCH(p.softcap > 0.0f, kCap, [&] {
      const int smooth = p.label_smoothing > 0.0f ? (p.weight ? 2 : 1) : 0;
      const int mode = p.soft_target ? (p.weight ? 4 : 3) : smooth;
      auto run = [&](auto mode_tag) { f(T{}, std::bool_constant<kCap>{}, mode_tag); };
      if (mode == 0) run(std::integral_constant<int, 0>{});
      if (mode == 1) run(std::integral_constant<int, 1>{});
      if (mode == 2) run(std::integral_constant<int, 2>{});
      if (mode == 3) run(std::integral_constant<int, 3>{});
      if (mode == 4) run(std::integral_constant<int, 4>{});
    });
  });
}

}  // namespace

int vocab_parallel_row_stats(const VocabParallelParams& p, int num_threads) {
  if (const int status = check_vocab_parallel(p, VocabParallelPass::kRowStats)) return status;
  dispatch(p, [&](auto t, auto cap, auto mode) {
    using T = decltype(t);
    constexpr bool kCap = decltype(cap)::value;
    constexpr int kMode = decltype(mode)::value;
    if constexpr (kMode >= 3) {
      parallel_for(p.n_rows, p.n_rows * p.n_cols, num_threads, [&](int64_t row) {
        soft_stats_row<T, kCap, kMode == 4>(p, row);
      });
    } else {
      class_rows(
          p, num_threads,
          [&](int64_t row, int64_t y) { class_stats_row<T, kCap, kMode>(p, row, y); },
          [&](int64_t row) { vocab_math::empty_stats(p.stats + row * kVocabStatsWidth); });
    }
  });
  return kLossOk;
}

int vocab_parallel_grad(const VocabParallelParams& p, int num_threads) {
  if (const int status = check_vocab_parallel(p, VocabParallelPass::kGrad)) return status;
  dispatch(p, [&](auto t, auto cap, auto mode) {
    using T = decltype(t);
    constexpr bool kCap = decltype(cap)::value;
    constexpr int kMode = decltype(mode)::value;
    if constexpr (kMode >= 3) {
      parallel_for(p.n_rows, p.n_rows * p.n_cols, num_threads, [&](int64_t row) {
        soft_grad_row<T, kCap, kMode == 4>(p, row);
      });
    } else {
      class_rows(
          p, num_threads,
          [&](int64_t row, int64_t y) { class_grad_row<T, kCap, kMode>(p, row, y); },
          [&](int64_t row) {
            std::memset(static_cast<T*>(p.grad) + row * p.grad_row_stride, 0,
                        sizeof(T) * size_t(p.n_cols));
          });
    }
  });
  return kLossOk;
}

}  // namespace fusedopt::cpu
