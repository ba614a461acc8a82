// Element math shared by the CUDA (csrc/cuda) and CPU (csrc/cpu) kernels: ONE copy.
// FO_HD marks functions callable on host and device.
#pragma once

#if defined(__CUDACC__)
#define FO_HD __host__ __device__ __forceinline__
#else
#define FO_HD inline
#endif

#include "fusedopt/math_loss.h"
#include "fusedopt/math_optim.h"
