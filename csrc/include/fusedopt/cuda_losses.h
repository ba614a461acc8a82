// Host entry points of the CUDA loss kernels (csrc/cuda/cross_entropy.cu, focal.cu).
// Torch-free: a params struct (params_loss.h, the one the cpu backend takes) and a
// cudaStream_t in, cudaError_t out (cudaErrorInvalidValue for a bad dtype / index code or
// shape, before anything is launched). Everything is enqueued on `stream`; no device value
// is read on the host. Zero rows / elements launch nothing. The row kernels of rows over
// 47 KB (up to the 64 KB row cache, csrc/cuda/loss_block.cuh) first allow themselves that
// much dynamic shared memory (cudaFuncSetAttribute, a host-side setting, no sync).
// Kernels run on the device current to the calling thread (the launchers make the
// tensors' device current), which must be the device of `stream`.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedopt/params_loss.h"

namespace fusedopt::cuda {

// `workspace`: one fp32 of device scratch, needed only for class targets with both class
// weights and label smoothing (the sum of the weights), else may be nullptr.
cudaError_t cross_entropy_fwd(const CrossEntropyParams& p, float* workspace, cudaStream_t stream);
cudaError_t focal_loss_fwd(const FocalParams& p, cudaStream_t stream);
// With p.reduce, p.loss receives sigmoid_focal_partials(p.n) fp32 partial sums.
cudaError_t sigmoid_focal_loss_fwd(const SigmoidFocalParams& p, cudaStream_t stream);

// grad[0..n) *= *scale (fp32 product, one rounding); nothing is written when *scale == 1.
cudaError_t scale_grad(void* grad, int64_t n, int dtype, const float* scale, cudaStream_t stream);

}  // namespace fusedopt::cuda
