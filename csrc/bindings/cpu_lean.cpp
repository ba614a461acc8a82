// pybind11 binding of the CPU lean Adam kernel (module fusedopt._cpu): the LeanAdamTable of
// lean_tables.h running csrc/cpu/lean_adam.cpp. Steps return an OptimStatus code and run
// without the GIL.
#include "../cpu/lean_blocks.h"
#include "fusedopt/cpu_lean.h"
#include "lean_tables.h"
#include "register.h"

namespace fusedopt::bind {
namespace {

struct CpuLeanKernels {
  static constexpr int kBadArgument = kOptimBadArgument;
  static int lean_adam(const LeanAdamTensors& t, const LeanAdamParams& p,
                       const MultiTensorPlan& plan, uintptr_t) {
    return cpu::lean_adam_step(t, p, plan);
  }
};

}  // namespace

void register_cpu_lean(pybind11::module_& m) {
  register_lean_tables<CpuLeanKernels>(m);
  m.def("set_portable_lean_blocks", &cpu::lean_blocks::set_portable_blocks,
        pybind11::arg("portable"),
        "Force the portable 8-bit decode/encode passes (tests compare them with AVX-512's)");
  m.def("lean_blocks_use_avx512", &cpu::lean_blocks::uses_avx512_blocks);
}

}  // namespace fusedopt::bind
