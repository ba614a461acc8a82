// Host entry points of the CUDA optimizer kernels (csrc/cuda/adam.cu, sgd.cu, l2norm.cu).
// Torch-free: raw device addresses, sizes and a chunk plan (multi_tensor.h, the planner the
// cpu backend uses too) in, a cudaStream_t in, cudaError_t out. Everything is enqueued on
// `stream`; nothing synchronises with the host and no device value is read on the host.
// The plan's launches must fit the kernel tables (at most kMaxTensors slots and kMaxChunks
// chunks each, see csrc/cuda/multi_tensor_apply.cuh), else cudaErrorInvalidValue.
#pragma once
#include <cuda_runtime.h>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/params_optim.h"

namespace fusedopt::cuda {

// Launch limits of the kernel tables, for the planner.
int max_tensors_per_launch();
int max_chunks_per_launch();
int64_t default_chunk_size();

// One Adam/AdamW step (params_optim.h): the update launches, then the step counters.
cudaError_t adam_step(const AdamTensors& t, const AdamParams& p, const MultiTensorPlan& plan,
                      cudaStream_t stream);

// One SGD step: the update launches, then the "initialised" flags (with momentum).
cudaError_t sgd_step(const SgdTensors& t, const SgdParams& p, const MultiTensorPlan& plan,
                     cudaStream_t stream);

// t.out = [sum of (x*inv_scale)^2, 1 if any element is inf/NaN else 0] (fp32[2], device).
// `partials` is device scratch of plan.num_chunks() doubles.
cudaError_t l2norm(const NormTensors& t, const MultiTensorPlan& plan, double* partials,
                   cudaStream_t stream);

}  // namespace fusedopt::cuda
