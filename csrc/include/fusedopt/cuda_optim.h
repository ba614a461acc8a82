// Host entry points of the CUDA optimizer kernels (csrc/cuda/adam.cu, sgd.cu, l2norm.cu).
// Torch-free: raw pointers, sizes and a chunk plan in, a cudaStream_t in, cudaError_t out.
#pragma once
#include <cuda_runtime.h>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/params_optim.h"

namespace fusedopt::cuda {}  // namespace fusedopt::cuda
