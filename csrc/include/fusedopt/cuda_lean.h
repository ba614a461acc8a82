// Host entry point of the CUDA lean Adam kernel (csrc/cuda/lean_adam.cu). Torch-free: raw
// device addresses, sizes and a chunk plan (multi_tensor.h) in, a cudaStream_t in,
// cudaError_t out; nothing synchronises with the host. The plan's launches must fit the
// kernel tables (csrc/cuda/multi_tensor_apply.cuh), else cudaErrorInvalidValue.
#pragma once
#include <cuda_runtime.h>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/params_lean.h"

namespace fusedopt::cuda {

// One lean Adam/AdamW step (params_lean.h): the update launches, then the step counters.
// 8-bit states need plan.chunk_size to be a multiple of 256.
cudaError_t lean_adam_step(const LeanAdamTensors& t, const LeanAdamParams& p,
                           const MultiTensorPlan& plan, cudaStream_t stream);

}  // namespace fusedopt::cuda
