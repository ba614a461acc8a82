// pybind11 bindings of the CUDA loss kernels (module fusedopt._cuda): the shared loss
// functions of loss_bindings.h with `stream` (a cudaStream_t as an integer; 0 = the legacy
// default stream) as their last argument. They return the cudaError_t as an int.
#include <cstdint>

#include "fusedopt/cuda_losses.h"
#include "loss_bindings.h"
#include "register.h"

namespace fusedopt::bind {
namespace {

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

struct CudaLossKernels {
  using Extra = uintptr_t;  // stream
  static int cross_entropy(const CrossEntropyParams& p, uintptr_t stream, uintptr_t workspace) {
    return cuda::cross_entropy_fwd(p, address_to<float>(workspace), as_stream(stream));
  }
  static int focal(const FocalParams& p, uintptr_t stream) {
    return cuda::focal_loss_fwd(p, as_stream(stream));
  }
  static int sigmoid_focal(const SigmoidFocalParams& p, uintptr_t stream) {
    return cuda::sigmoid_focal_loss_fwd(p, as_stream(stream));
  }
  static int scale_grad(void* grad, int64_t n, int dtype, const float* scale, uintptr_t stream) {
    return cuda::scale_grad(grad, n, dtype, scale, as_stream(stream));
  }
};

}  // namespace

void register_cuda_losses(pybind11::module_& m) {
  register_loss_functions<CudaLossKernels>(m, "stream");
}

}  // namespace fusedopt::bind
