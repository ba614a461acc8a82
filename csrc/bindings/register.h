// Registration hooks of the pybind11 modules: each op family binds its entry points in
// its own file (cpu_losses.cpp, cpu_optim.cpp, cpu_vocab_parallel.cpp, cpu_lean.cpp,
// cuda_losses.cpp, cuda_optim.cpp, cuda_vocab_parallel.cpp, cuda_lean.cpp).
// Bindings take raw pointers as uintptr_t and return error codes; they never see torch.
#pragma once
#include <pybind11/pybind11.h>

namespace fusedopt::bind {
void register_cpu_losses(pybind11::module_& m);
void register_cpu_optim(pybind11::module_& m);
void register_cpu_vocab_parallel(pybind11::module_& m);
void register_cpu_lean(pybind11::module_& m);
void register_cuda_losses(pybind11::module_& m);
void register_cuda_optim(pybind11::module_& m);
void register_cuda_vocab_parallel(pybind11::module_& m);
void register_cuda_lean(pybind11::module_& m);
}  // namespace fusedopt::bind
