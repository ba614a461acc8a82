// Multi-tensor sum of squares and inf/NaN flag on CPU tensors: the norm pass of the
// optimizers (gradient clipping, loss-scale overflow check).
//
//   out[0] = (sum over every element x of every tensor of x^2) * inv_scale^2
//   out[1] = 1 if any element is inf/NaN else 0
//
// Accumulation is in double: the square of a finite fp32/bf16/fp16 value is at most about
// 1.2e77, so the sum is finite exactly when every element is, and one pass gives both the
// sum and the flag. Deterministic whatever the number of threads: each chunk of the plan
// (multi_tensor.h) sums its elements into 16 fixed lanes (element i of the chunk goes to
// lane i % 16) folded pairwise in a fixed order, its partial is stored at the chunk's
// index, and the partials are added in chunk order on one thread.
//
// Memory traffic: reads every element once (B bytes each), writes 8 bytes per chunk + 8.
#include <cmath>

#include "fusedopt/cpu_optim.h"
#include "fusedopt/dispatch.h"
#include "multi_tensor_loop.h"

namespace fusedopt::cpu {
namespace {

constexpr int kLanes = 16;

template <typename T>
FO_CPU_CLONES double sum_of_squares(const T* __restrict x, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = to_float(x[i + j]);
      lane[j] += v * v;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const double v = to_float(x[i + j]);
    lane[j] += v * v;
  }
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
  return lane[0];
}

template <typename T>
void chunk_partials(const NormTensors& t, const MultiTensorPlan& plan, double* partials) {
  for_each_chunk(plan, t.numel, [&](int32_t i, int64_t c, int64_t start, int64_t len) {
    partials[c] = sum_of_squares(static_cast<const T*>(t.tensors[i]) + start, len);
  });
}

}  // namespace

int l2norm(const NormTensors& t, const MultiTensorPlan& plan, double* partials) {
  if (t.dtype < 0 || t.dtype > 2) return kOptimBadDType;
  FO_DTYPE_SWITCH(t.dtype, T, [&] { chunk_partials<T>(t, plan, partials); });
  double total = 0.0;
  for (int64_t c = 0; c < plan.num_chunks(); ++c) total += partials[c];
  const double inv = scalar_or(t.inv_scale, 1.0f);
  t.out[0] = static_cast<float>(total * (inv * inv));
  t.out[1] = std::isfinite(total) ? 0.0f : 1.0f;
  return kOptimOk;
}

}  // namespace fusedopt::cpu
