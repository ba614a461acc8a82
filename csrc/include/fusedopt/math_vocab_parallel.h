// Element math of the vocab-parallel cross-entropy, shared by the CPU
// (csrc/cpu/vocab_parallel.cpp) and CUDA (csrc/cuda/vocab_parallel.cu) kernels on top of
// the cross-entropy's (math_loss.h: lse_fold / lse_merge, soft-capping, soft target
// weights). A rank holds the columns [offset, offset + C) of num_classes.
//
//   row stats  [m = max_j x_j, sum_j exp(x_j - m), x_y if y is local else 0,
//               sum_j w_j (m - x_j) (smoothing) | soft: sum_j r_j (m - x_j), sum_j r_j]
//   (gap sums relative to the shard's max, kept in one pass by math_loss.h's gap_fold /
//   gap_at_max: every addend >= 0, so nothing cancels at large logits)
//   gradient   dx_j = exp(x_j - row_max) a / exp(log_sum) - t_j,  dl_j = dx_j (1 - (x_j/s)^2)
//              class: t_j = c w_j + b [offset + j == y];  soft: t_j = c r_j
// from the combined coefficients [row_max, log_sum, a, b, c] of the full row.
#pragma once
#include <cstdint>

#include "fusedopt/math.h"
#include "fusedopt/params_vocab_parallel.h"

namespace fusedopt::vocab_math {

// The local column of class y, or -1 when this rank does not hold it. Written so that no
// value of y overflows (y - offset is only formed once y >= offset).
FO_LOSS_HD int64_t owned_column(int64_t y, int64_t offset, int64_t n_cols) {
  return (y >= offset && y - offset < n_cols) ? y - offset : -1;
}

// Row statistics of an ignored row (the ops layer never reads them) and of a rank
// without columns.
FO_LOSS_HD void empty_stats(float* out) {
  out[0] = -loss_math::kInf;
  out[1] = out[2] = out[3] = 0.0f;
}

// The per-row scalars of the gradient pass: the row max, coef = a / sum_k exp(x_k - max)
// (the softmax division folded into one factor, as in the fused cross-entropy), and the
// target coefficients b (class column) and c (smoothing or soft weights).
struct GradRow {
  float row_max, coef, b, c;
};

FO_LOSS_HD GradRow grad_row(const float* coefs) {
  GradRow k;
  k.row_max = coefs[0];
  k.coef = coefs[2] / loss_math::fexp(coefs[1]);
  k.b = coefs[3];
  k.c = coefs[4];
  return k;
}

// dloss/dl of one logit: x the (capped) logit, t its target part; fp32 throughout.
template <bool kCapped>
FO_LOSS_HD float grad_value(float x, const GradRow& k, float t, float cap) {
  const float g = loss_math::shifted_exp(x, k.row_max) * k.coef - t;
  if constexpr (kCapped) return g * loss_math::softcap_slope(x, cap);
  return g;
}

}  // namespace fusedopt::vocab_math
