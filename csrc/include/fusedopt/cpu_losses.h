// Host entry points of the CPU loss kernels (csrc/cpu/cross_entropy.cpp, focal.cpp,
// loss_buffers.cpp). Torch-free: a params struct (params_loss.h) and a thread count in, a
// LossStatus code out. `num_threads` <= 0 means OpenMP's default. Results never depend on
// the thread count: every row (or span of elements) is computed by one thread, in a fixed
// order. Included by the bindings (csrc/bindings/cpu_losses.cpp).
#pragma once
#include <cstdint>

#include "fusedopt/params_loss.h"

namespace fusedopt::cpu {

int cross_entropy_fwd(const CrossEntropyParams& p, int num_threads);
int focal_loss_fwd(const FocalParams& p, int num_threads);
int sigmoid_focal_loss_fwd(const SigmoidFocalParams& p, int num_threads);

// grad[0..n) *= *scale (fp32 product, one rounding); nothing is written when *scale == 1.
// Advises the kernel to back [data, data + bytes) with transparent huge pages (the 2 MiB
// aligned interior; a hint, Linux only). Returns 0 or the errno of madvise.
int advise_huge_pages(void* data, int64_t bytes);

int scale_grad(void* grad, int64_t n, int dtype, const float* scale, int num_threads);

}  // namespace fusedopt::cpu
