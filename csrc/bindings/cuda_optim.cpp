// pybind11 bindings of the CUDA optimizer kernels (module fusedopt._cuda): the pointer
// tables of optim_tables.h running the CUDA kernels on `stream` (a cudaStream_t as an
// integer), the norm's partials in caller-given device scratch (`scratch`, num_chunks
// doubles). Steps return the cudaError_t as an int and run without the GIL; a table whose
// argument lists disagree raises ValueError when it is built.
#include "fusedopt/cuda_optim.h"
#include "optim_tables.h"
#include "register.h"

namespace fusedopt::bind {
namespace {

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

struct CudaOptimKernels {
  static constexpr int kBadArgument = static_cast<int>(cudaErrorInvalidValue);
  static constexpr bool kHostPartials = false;
  static int adam(const AdamTensors& t, const AdamParams& p, const MultiTensorPlan& plan,
                  uintptr_t stream) {
    return cuda::adam_step(t, p, plan, as_stream(stream));
  }
  static int sgd(const SgdTensors& t, const SgdParams& p, const MultiTensorPlan& plan,
                 uintptr_t stream) {
    return cuda::sgd_step(t, p, plan, as_stream(stream));
  }
  static int norm(const NormTensors& t, const MultiTensorPlan& plan, double* partials,
                  uintptr_t stream) {
    return cuda::l2norm(t, plan, partials, as_stream(stream));
  }
};

}  // namespace

void register_cuda_optim(pybind11::module_& m) {
  m.attr("DEFAULT_CHUNK_SIZE") = cuda::default_chunk_size();
  m.attr("MAX_TENSORS") = cuda::max_tensors_per_launch();
  m.attr("MAX_CHUNKS") = cuda::max_chunks_per_launch();
  register_optim_tables<CudaOptimKernels>(m);
}

}  // namespace fusedopt::bind
