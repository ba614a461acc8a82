// Host entry points of the CUDA loss kernels (csrc/cuda/cross_entropy.cu, focal.cu).
// Torch-free: a params struct (params_loss.h) and a cudaStream_t in, cudaError_t out.
#pragma once
#include <cuda_runtime.h>

#include "fusedopt/params_loss.h"

namespace fusedopt::cuda {}  // namespace fusedopt::cuda
