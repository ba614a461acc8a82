// pybind11 bindings of the CUDA vocab-parallel cross-entropy (module fusedopt._cuda): the
// shared functions of vocab_parallel_bindings.h with `stream` (a cudaStream_t as an
// integer; 0 = the legacy default stream) as their last argument. They return the
// cudaError_t as an int.
#include "fusedopt/cuda_vocab_parallel.h"
#include "register.h"
#include "vocab_parallel_bindings.h"

namespace fusedopt::bind {
namespace {

struct CudaVocabParallelKernels {
  using Extra = uintptr_t;  // stream
  static int row_stats(const VocabParallelParams& p, uintptr_t stream) {
    return cuda::vocab_parallel_row_stats(p, reinterpret_cast<cudaStream_t>(stream));
  }
  static int grad(const VocabParallelParams& p, uintptr_t stream) {
    return cuda::vocab_parallel_grad(p, reinterpret_cast<cudaStream_t>(stream));
  }
};

}  // namespace

void register_cuda_vocab_parallel(pybind11::module_& m) {
  register_vocab_parallel_functions<CudaVocabParallelKernels>(m, "stream");
}

}  // namespace fusedopt::bind
