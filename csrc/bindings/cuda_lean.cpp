// pybind11 binding of the CUDA lean Adam kernel (module fusedopt._cuda): the LeanAdamTable of
// lean_tables.h running csrc/cuda/lean_adam.cu on `stream` (a cudaStream_t as an integer).
// Steps return the cudaError_t as an int and run without the GIL.
#include "fusedopt/cuda_lean.h"
#include "lean_tables.h"
#include "register.h"

namespace fusedopt::bind {
namespace {

struct CudaLeanKernels {
  static constexpr int kBadArgument = static_cast<int>(cudaErrorInvalidValue);
  static int lean_adam(const LeanAdamTensors& t, const LeanAdamParams& p,
                       const MultiTensorPlan& plan, uintptr_t stream) {
    return cuda::lean_adam_step(t, p, plan, reinterpret_cast<cudaStream_t>(stream));
  }
};

}  // namespace

void register_cuda_lean(pybind11::module_& m) { register_lean_tables<CudaLeanKernels>(m); }

}  // namespace fusedopt::bind
