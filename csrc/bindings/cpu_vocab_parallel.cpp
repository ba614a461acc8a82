// pybind11 bindings of the CPU vocab-parallel cross-entropy (module fusedopt._cpu): the
// shared functions of vocab_parallel_bindings.h with `num_threads` (<= 0: OpenMP's
// default) as their last argument. They return a LossStatus code (0 = ok).
#include "fusedopt/cpu_vocab_parallel.h"
#include "register.h"
#include "vocab_parallel_bindings.h"

namespace fusedopt::bind {
namespace {

struct CpuVocabParallelKernels {
  using Extra = int;  // num_threads
  static int row_stats(const VocabParallelParams& p, int num_threads) {
    return cpu::vocab_parallel_row_stats(p, num_threads);
  }
  static int grad(const VocabParallelParams& p, int num_threads) {
    return cpu::vocab_parallel_grad(p, num_threads);
  }
};

}  // namespace

void register_cpu_vocab_parallel(pybind11::module_& m) {
  register_vocab_parallel_functions<CpuVocabParallelKernels>(m, "num_threads");
}

}  // namespace fusedopt::bind
