// fusedopt._cuda: the CUDA C++ kernels, linked with the static CUDA runtime. Importing it
// needs no GPU and no driver; calls report cudaError_t codes instead.
#include "fusedopt/cuda_api.h"
#include "register.h"

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedopt CUDA kernels (torch-free; raw pointers in, cudaError_t codes out)";
  m.def("device_count", [] {
    int n = 0;
    cudaError_t err = fusedopt::cuda::device_count(&n);
    return pybind11::make_tuple(static_cast<int>(err), n);
  });
  m.def("error_string", &fusedopt::cuda::error_string);
  m.def("runtime_version", &fusedopt::cuda::runtime_version);
  m.def("driver_version", &fusedopt::cuda::driver_version);
  fusedopt::bind::register_cuda_losses(m);
  fusedopt::bind::register_cuda_optim(m);
  fusedopt::bind::register_cuda_vocab_parallel(m);
  fusedopt::bind::register_cuda_lean(m);
}
