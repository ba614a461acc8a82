// pybind11 bindings of the CPU optimizer kernels (module fusedopt._cpu): the pointer tables
// of optim_tables.h running the cpu kernels (the `stream` and `scratch` arguments are
// unused here), the chunk planner for tests, and the OpenMP thread count. Steps return an
// OptimStatus code and run without the GIL.
#include <omp.h>

#include "fusedopt/cpu_optim.h"
#include "optim_tables.h"
#include "register.h"

namespace py = pybind11;

namespace fusedopt::bind {
namespace {

struct CpuOptimKernels {
  static constexpr int kBadArgument = kOptimBadArgument;
  static constexpr bool kHostPartials = true;
  static int adam(const AdamTensors& t, const AdamParams& p, const MultiTensorPlan& plan,
                  uintptr_t) {
    return cpu::adam_step(t, p, plan);
  }
  static int sgd(const SgdTensors& t, const SgdParams& p, const MultiTensorPlan& plan,
                 uintptr_t) {
    return cpu::sgd_step(t, p, plan);
  }
  static int norm(const NormTensors& t, const MultiTensorPlan& plan, double* partials,
                  uintptr_t) {
    return cpu::l2norm(t, plan, partials);
  }
};

py::dict plan_chunks(const std::vector<int64_t>& numel, int64_t chunk_size, int max_tensors,
                     int max_chunks) {
  Layout layout(numel, chunk_size, max_tensors, max_chunks);
  py::list launches;
  for (const LaunchRange& l : layout.plan.launches)
    launches.append(py::make_tuple(l.slot_begin, l.slot_end, l.chunk_begin, l.chunk_end));
  py::dict out;
  out["chunk_size"] = layout.plan.chunk_size;
  out["slot_tensor"] = layout.plan.slot_tensor;
  out["chunk_slot"] = layout.plan.chunk_slot;
  out["chunk_start"] = layout.plan.chunk_start;
  out["launches"] = launches;
  return out;
}

const char* optim_status_string(int code) {
  switch (code) {
    case kOptimOk: return "ok";
    case kOptimBadDType: return "unsupported dtype code";
    case kOptimBadArgument: return "inconsistent arguments (list lengths, missing state lists)";
    default: return "unknown status code";
  }
}

}  // namespace

void register_cpu_optim(py::module_& m) {
  using py::arg;
  m.attr("DEFAULT_CHUNK_SIZE") = kDefaultChunkSize;
  m.attr("DEFAULT_MAX_TENSORS") = kDefaultMaxTensors;
  m.attr("DEFAULT_MAX_CHUNKS") = kDefaultMaxChunks;

  register_optim_tables<CpuOptimKernels>(m);

  m.def("plan_chunks", &plan_chunks, arg("numel"), arg("chunk_size"), arg("max_tensors"),
        arg("max_chunks"), "The chunk plan of multi_tensor.h, as lists (for tests)");
  m.def("optim_status_string", &optim_status_string, arg("code"));
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    omp_set_num_threads(n);
  }, arg("n"), "Threads of the OpenMP loops started from the calling thread");
  m.def("get_num_threads", [] { return omp_get_max_threads(); });
}

}  // namespace fusedopt::bind
