// Multi-tensor sum of squares and inf/NaN flag on CPU tensors: the norm pass of the
// optimizers (gradient clipping, loss-scale overflow check).
//
//   out[0] = (sum over every element x of every tensor of x^2) * inv_scale^2
//   out[1] = 1 if any element is inf/NaN else 0
//
// Accumulation is in double: the square of a finite fp32/bf16/fp16 value is at most about
// 1.2e77, so the sum is finite exactly when every element is, and one pass gives both the
// sum and the flag. Deterministic whatever the number of threads: each chunk of the plan
// (multi_tensor.h) sums its elements in an order fixed by its length (sum_of_squares), its
// partial is stored at the chunk's index, and the partials are added in chunk order on one
// thread.
//
// Memory traffic: reads every element once (B bytes each), writes 8 bytes per chunk + 8.
#include <cmath>

#include "fusedopt/cpu_optim.h"
#include "fusedopt/dispatch.h"
#include "multi_tensor_loop.h"

namespace fusedopt::cpu {
namespace {

constexpr int kLanes = 16;   // independent double accumulators per stream
constexpr int kStreams = 4;  // segments of a chunk read side by side

// Sum of squares of x[0..n) in double, in an order fixed by n alone. The chunk is read as
// kStreams segments of `seg` elements side by side (several concurrent memory streams keep
// more loads in flight than one, about 1.4x the bandwidth of a single stream here);
// element k of segment s goes to lane[s][k % kLanes]; the tail after the segments goes to
// the lanes of segment 0; the lanes are folded pairwise per segment, then the segments
// are added in order.
template <typename T>
FO_CPU_CLONES double sum_of_squares(const T* __restrict x, int64_t n) {
  double lane[kStreams][kLanes] = {};
  const int64_t seg = n / (kStreams * kLanes) * kLanes;
  for (int64_t i = 0; i < seg; i += kLanes) {
    for (int s = 0; s < kStreams; ++s) {
      for (int j = 0; j < kLanes; ++j) {
        const double v = to_float(x[s * seg + i + j]);
        lane[s][j] += v * v;
      }
    }
  }
  for (int64_t i = kStreams * seg; i < n; ++i) {
    const double v = to_float(x[i]);
    lane[0][(i - kStreams * seg) % kLanes] += v * v;
  }
  double total = 0.0;
  for (int s = 0; s < kStreams; ++s) {
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int j = 0; j < width; ++j) lane[s][j] += lane[s][j + width];
    total += lane[s][0];
  }
  return total;
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
