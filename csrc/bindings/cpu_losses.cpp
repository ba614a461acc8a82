// pybind11 bindings of the CPU loss kernels (module fusedopt._cpu): the shared loss
// functions of loss_bindings.h with `num_threads` (<= 0: OpenMP's default) as their last
// argument, plus the huge-page hint of the gradient buffers.
#include <cstdint>

#include "fusedopt/cpu_losses.h"
#include "loss_bindings.h"
#include "register.h"

namespace py = pybind11;

namespace fusedopt::bind {
namespace {

struct CpuLossKernels {
  using Extra = int;  // num_threads
  static int cross_entropy(const CrossEntropyParams& p, int num_threads, uintptr_t) {
    return cpu::cross_entropy_fwd(p, num_threads);
  }
  static int focal(const FocalParams& p, int num_threads) {
    return cpu::focal_loss_fwd(p, num_threads);
  }
  static int sigmoid_focal(const SigmoidFocalParams& p, int num_threads) {
    return cpu::sigmoid_focal_loss_fwd(p, num_threads);
  }
  static int scale_grad(void* grad, int64_t n, int dtype, const float* scale, int num_threads) {
    return cpu::scale_grad(grad, n, dtype, scale, num_threads);
  }
};

}  // namespace

void register_cpu_losses(py::module_& m) {
  register_loss_functions<CpuLossKernels>(m, "num_threads");
  m.def("advise_huge_pages",
        [](uintptr_t data, int64_t bytes) {
          return cpu::advise_huge_pages(address_to<void>(data), bytes);
        },
        py::arg("data"), py::arg("bytes"),
        "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of a buffer; 0 or errno.");
}

}  // namespace fusedopt::bind
