// fusedopt._cpu: the C++ (OpenMP + SIMD) kernels for CPU tensors.
#include <omp.h>

#include "register.h"

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fusedopt CPU kernels (torch-free; raw pointers in, error codes out)";
  m.def("max_threads", [] { return omp_get_max_threads(); });
  fusedopt::bind::register_cpu_losses(m);
  fusedopt::bind::register_cpu_optim(m);
  fusedopt::bind::register_cpu_vocab_parallel(m);
  fusedopt::bind::register_cpu_lean(m);
}
