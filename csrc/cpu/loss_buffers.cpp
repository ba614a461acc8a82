// The gradient buffers of the CPU losses: huge-page advice for a fresh one, and the
// in-place rescale of a stored one.
//
// advise_huge_pages: a fresh N x C gradient is written once by the forward kernel; with
// 4 KiB pages the first touch of each page costs a page fault (128k of them for a
// 4096 x 32000 fp32 gradient, as long as the kernel's own work), with 2 MiB pages 256.
// The advice (madvise MADV_HUGEPAGE on the 2 MiB-aligned interior, Linux only) is a hint:
// where transparent huge pages are off it changes nothing.
//
// scale_grad: grad *= scale, the backward of a loss with a scalar grad_output
// (docs/architecture.md, scale_grad_). The product is formed in fp32 and rounded once. With scale == 1 (the usual case: a
// 'mean' or 'sum' loss whose gradient the forward already scaled) nothing is read or
// written, so a loss's forward + backward costs 2 reads + 1 write of the logits.
// Otherwise: reads and writes n*b bytes, in fixed spans of kScaleSpan elements.
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cerrno>
#include <cstdint>

#include "fusedopt/cpu_losses.h"
#include "loss_lanes.h"

namespace fusedopt::cpu {
namespace {

constexpr int64_t kScaleSpan = int64_t(1) << 16;

template <typename T>
FO_LOSS_CLONES void scale_span(T* grad, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) grad[i] = from_float<T>(to_float(grad[i]) * scale);
}

}  // namespace

int advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (bytes <= 0 || end <= begin) return 0;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0 ? 0 : errno;
#else
  (void)data;
  (void)bytes;
  return 0;
#endif
}

int scale_grad(void* grad, int64_t n, int dtype, const float* scale, int num_threads) {
  if (!valid_dtype(dtype)) return kLossBadDType;
  if (n < 0) return kLossBadShape;
  const float s = *scale;
  if (s == 1.0f) return kLossOk;
  const int64_t spans = (n + kScaleSpan - 1) / kScaleSpan;
  FO_DTYPE_SWITCH(dtype, T, [&] {
    parallel_for(spans, n, num_threads, [&](int64_t span) {
      const int64_t begin = span * kScaleSpan;
      const int64_t len = n - begin < kScaleSpan ? n - begin : kScaleSpan;
      scale_span<T>(static_cast<T*>(grad) + begin, len, s);
    });
  });
  return kLossOk;
}

}  // namespace fusedopt::cpu
