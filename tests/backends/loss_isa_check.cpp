// Runs every CPU loss kernel (every dtype, most flags, -inf and +-1e4 logits, ignored and
// out-of-range targets) on fixed inputs and prints an FNV-1a hash of all the output bits.
// Built by tests/backends/test_cpu_loss_isas.py once per ISA level, without clones
// (-DFO_LOSS_CLONES=): the hashes must agree.
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include <cmath>
#include "fusedopt/cpu_losses.h"
#include "fusedopt/dispatch.h"
using namespace fusedopt;
static uint64_t h = 1469598103934665603ull;
static void mix(const void* p, size_t n) { auto b = (const unsigned char*)p; for (size_t i = 0; i < n; ++i) { h ^= b[i]; h *= 1099511628211ull; } }
static uint32_t rng = 12345; static float frand() { rng = rng * 1664525u + 1013904223u; return float(rng >> 8) / 16777216.0f; }
template <typename T> static void run_dtype(int code) {
  const int64_t N = 37, C = 1031;
  std::vector<T> x(N * C), q(N * C), g(N * C); std::vector<float> loss(N), w(C), part(4), xs(N * C);
  for (auto& v : xs) v = (frand() - 0.5f) * 24.0f;
  xs[5] = -INFINITY; xs[77] = 1e4f; xs[78] = -1e4f;
  for (int64_t i = 0; i < N * C; ++i) { x[i] = from_float<T>(xs[i]); q[i] = from_float<T>(frand() / C * 2); }
  for (auto& v : w) v = frand() + 0.5f;
  std::vector<int64_t> y(N); for (auto& v : y) v = int64_t(frand() * C); y[3] = -100; y[4] = C + 2;
  float scales[2] = {0.37f, 1.3f};
  for (int soft = 0; soft < 2; ++soft) for (int cap = 0; cap < 2; ++cap) for (int wt = 0; wt < 2; ++wt) for (int eps = 0; eps < 2; ++eps) {
    CrossEntropyParams p; p.logits = x.data(); p.logits_row_stride = C; p.grad = g.data(); p.grad_row_stride = C;
    p.row_loss = loss.data(); p.target = soft ? (const void*)q.data() : (const void*)y.data(); p.target_row_stride = C;
    p.weight = wt ? w.data() : nullptr; p.scales = scales; p.n_rows = N; p.n_cols = C; p.dtype = code; p.index_type = 0;
    p.label_smoothing = eps ? 0.1f : 0.0f; p.z_loss = 1e-3f; p.softcap = cap ? 7.0f : 0.0f; p.soft_target = soft;
    cpu::cross_entropy_fwd(p, 2); mix(loss.data(), N * 4); mix(g.data(), N * C * sizeof(T));
  }
  for (int eps = 0; eps < 2; ++eps) for (int al = 0; al < 2; ++al) for (float gamma : {0.0f, 0.5f, 2.0f}) {
    FocalParams p; p.logits = x.data(); p.logits_row_stride = C; p.grad = g.data(); p.grad_row_stride = C;
    p.row_loss = loss.data(); p.target = y.data(); p.alpha = al ? w.data() : nullptr; p.scales = scales;
    p.n_rows = N; p.n_cols = C; p.dtype = code; p.index_type = 0; p.gamma = gamma; p.label_smoothing = eps ? 0.1f : 0.0f;
    cpu::focal_loss_fwd(p, 2); mix(loss.data(), N * 4); mix(g.data(), N * C * sizeof(T));
  }
  for (int red = 0; red < 2; ++red) for (float alpha : {0.25f, -1.0f}) {
    std::vector<T> tl(N * C);
    SigmoidFocalParams p; p.logits = x.data(); p.target = q.data(); p.loss = red ? (void*)part.data() : (void*)tl.data();
    p.grad = g.data(); p.scales = scales; p.n = N * C > 4 * 4096 ? 4 * 4096 : N * C; p.dtype = code; p.alpha = alpha;
    p.gamma = 1.5f; p.label_smoothing = 0.05f; p.reduce = red;
    cpu::sigmoid_focal_loss_fwd(p, 2);
    if (red) mix(part.data(), 4 * sigmoid_focal_partials(p.n)); else mix(tl.data(), p.n * sizeof(T));
    mix(g.data(), p.n * sizeof(T));
  }
}
int main() { run_dtype<float>(0); run_dtype<bf16_t>(1); run_dtype<fp16_t>(2); printf("%016llx\n", (unsigned long long)h); }
