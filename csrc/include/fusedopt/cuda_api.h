// Host-callable entry points of the CUDA kernels (csrc/cuda/*.cu). Torch-free: raw
// pointers, sizes and a cudaStream_t in, cudaError_t out. Included by the bindings.
// The loss entry points are declared in cuda_losses.h, the optimizer ones in cuda_optim.h.
#pragma once
#include <cuda_runtime.h>

namespace fusedopt::cuda {

cudaError_t device_count(int* count);
const char* error_string(int code);
int runtime_version();
// CUDA version the installed driver supports (e.g. 13000), 0 when there is no driver.
int driver_version();

}  // namespace fusedopt::cuda
