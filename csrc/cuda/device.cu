// Device queries for fusedopt._cuda: lets the Python side say precisely why the `cuda`
// backend cannot run (no driver, a driver too old for the runtime linked in, no device)
// without touching torch.
#include <cuda_runtime.h>

#include "fusedopt/cuda_api.h"

namespace fusedopt::cuda {

cudaError_t device_count(int* count) { return cudaGetDeviceCount(count); }

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  return v;
}

}  // namespace fusedopt::cuda
