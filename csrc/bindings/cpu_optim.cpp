// pybind11 bindings of the CPU optimizer kernels (module fusedopt._cpu).
//
// A bucket's pointer table is a C++ object built once from the addresses of the tensors
// that persist from step to step (params, states, masters, step counters / flags) and
// their element counts, together with its chunk plan; each step passes only the gradient
// addresses and the scalars. Addresses are plain integers (uintptr_t), device scalars are
// addresses too (0 = absent). Steps return an OptimStatus code and run without the GIL.
#include <omp.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fusedopt/cpu_optim.h"
#include "register.h"

namespace py = pybind11;

namespace fusedopt::bind {
namespace {

using Addresses = std::vector<uintptr_t>;

template <typename P>
std::vector<P> as_pointers(const Addresses& a) {
  std::vector<P> out(a.size());
  for (size_t i = 0; i < a.size(); ++i) out[i] = reinterpret_cast<P>(a[i]);
  return out;
}

template <typename P>
const P* scalar_ptr(uintptr_t a) { return reinterpret_cast<const P*>(a); }

void check_length(const char* name, size_t got, size_t expected) {
  if (got != expected)
    throw py::value_error(std::string(name) + " has " + std::to_string(got) +
                          " addresses, expected " + std::to_string(expected));
}

void check_dtype(int dtype) {
  if (dtype < 0 || dtype > 2)
    throw py::value_error("dtype code must be 0 (f32), 1 (bf16) or 2 (f16), got " +
                          std::to_string(dtype));
}

// Element counts and chunk plan of one list of tensors.
struct Layout {
  std::vector<int64_t> numel;
  MultiTensorPlan plan;

  Layout(std::vector<int64_t> sizes, int64_t chunk_size, int max_tensors, int max_chunks)
      : numel(std::move(sizes)) {
    if (make_multi_tensor_plan(numel.data(), static_cast<int64_t>(numel.size()), chunk_size,
                               max_tensors, max_chunks, &plan) != kOptimOk)
      throw py::value_error("invalid plan: numels must be >= 0, chunk_size >= 1, limits >= 1 (got "
                            "chunk_size=" + std::to_string(chunk_size) + ", max_tensors=" +
                            std::to_string(max_tensors) + ", max_chunks=" +
                            std::to_string(max_chunks) + ")");
  }
  size_t size() const { return numel.size(); }
};

class AdamTable {
 public:
  AdamTable(std::vector<int64_t> numel, int dtype, const Addresses& params,
            const Addresses& exp_avgs, const Addresses& exp_avg_sqs,
            const std::optional<Addresses>& max_exp_avg_sqs,
            const std::optional<Addresses>& masters, const Addresses& steps, int64_t chunk_size,
            int max_tensors, int max_chunks)
      : layout_(std::move(numel), chunk_size, max_tensors, max_chunks), dtype_(dtype) {
    check_dtype(dtype);
    const size_t n = layout_.size();
    check_length("params", params.size(), n);
    check_length("exp_avgs", exp_avgs.size(), n);
    check_length("exp_avg_sqs", exp_avg_sqs.size(), n);
    check_length("steps", steps.size(), n);
    params_ = as_pointers<void*>(params);
    exp_avg_ = as_pointers<float*>(exp_avgs);
    exp_avg_sq_ = as_pointers<float*>(exp_avg_sqs);
    step_ = as_pointers<float*>(steps);
    if (max_exp_avg_sqs) {
      check_length("max_exp_avg_sqs", max_exp_avg_sqs->size(), n);
      max_exp_avg_sq_ = as_pointers<float*>(*max_exp_avg_sqs);
    }
    if (masters) {
      check_length("master_params", masters->size(), n);
      master_ = as_pointers<float*>(*masters);
    }
  }

  int step(const Addresses& grads, double lr, uintptr_t lr_ptr, double beta1, uintptr_t beta1_ptr,
           double beta2, uintptr_t beta2_ptr, double eps, double weight_decay, bool amsgrad,
           bool maximize, bool decoupled, uintptr_t inv_scale, uintptr_t clip_coef,
           uintptr_t skip) {
    if (grads.size() != layout_.size()) return kOptimBadArgument;
    if (amsgrad && max_exp_avg_sq_.empty() && layout_.size() > 0) return kOptimBadArgument;
    const std::vector<const void*> grad_ptrs = as_pointers<const void*>(grads);
    AdamTensors t;
    t.num_tensors = static_cast<int64_t>(layout_.size());
    t.dtype = dtype_;
    t.numel = layout_.numel.data();
    t.params = params_.data();
    t.grads = grad_ptrs.data();
    t.exp_avg = exp_avg_.data();
    t.exp_avg_sq = exp_avg_sq_.data();
    t.max_exp_avg_sq = max_exp_avg_sq_.empty() ? nullptr : max_exp_avg_sq_.data();
    t.master = master_.empty() ? nullptr : master_.data();
    t.step = step_.data();
    AdamParams p;
    p.lr = {lr, scalar_ptr<float>(lr_ptr)};
    p.beta1 = {beta1, scalar_ptr<float>(beta1_ptr)};
    p.beta2 = {beta2, scalar_ptr<float>(beta2_ptr)};
    p.eps = eps;
    p.weight_decay = weight_decay;
    p.amsgrad = amsgrad;
    p.maximize = maximize;
    p.decoupled = decoupled;
    p.inv_scale = scalar_ptr<float>(inv_scale);
    p.clip_coef = scalar_ptr<float>(clip_coef);
    p.skip = scalar_ptr<float>(skip);
    return cpu::adam_step(t, p, layout_.plan);
  }

 private:
  Layout layout_;
  int dtype_;
  std::vector<void*> params_;
  std::vector<float*> exp_avg_, exp_avg_sq_, max_exp_avg_sq_, master_, step_;
};

class SgdTable {
 public:
  SgdTable(std::vector<int64_t> numel, int dtype, const Addresses& params,
           const std::optional<Addresses>& momentum_buffers,
           const std::optional<Addresses>& masters, const Addresses& initialized,
           int64_t chunk_size, int max_tensors, int max_chunks)
      : layout_(std::move(numel), chunk_size, max_tensors, max_chunks), dtype_(dtype) {
    check_dtype(dtype);
    const size_t n = layout_.size();
    check_length("params", params.size(), n);
    check_length("initialized", initialized.size(), n);
    params_ = as_pointers<void*>(params);
    initialized_ = as_pointers<float*>(initialized);
    if (momentum_buffers) {
      check_length("momentum_buffers", momentum_buffers->size(), n);
      buffer_ = as_pointers<float*>(*momentum_buffers);
    }
    if (masters) {
      check_length("master_params", masters->size(), n);
      master_ = as_pointers<float*>(*masters);
    }
  }

  int step(const Addresses& grads, double lr, uintptr_t lr_ptr, double momentum,
           double dampening, double weight_decay, bool nesterov, bool maximize,
           uintptr_t inv_scale, uintptr_t clip_coef, uintptr_t skip) {
    if (grads.size() != layout_.size()) return kOptimBadArgument;
    const std::vector<const void*> grad_ptrs = as_pointers<const void*>(grads);
    SgdTensors t;
    t.num_tensors = static_cast<int64_t>(layout_.size());
    t.dtype = dtype_;
    t.numel = layout_.numel.data();
    t.params = params_.data();
    t.grads = grad_ptrs.data();
    t.momentum_buffer = buffer_.empty() ? nullptr : buffer_.data();
    t.master = master_.empty() ? nullptr : master_.data();
    t.initialized = initialized_.data();
    SgdParams p;
    p.lr = {lr, scalar_ptr<float>(lr_ptr)};
    p.momentum = momentum;
    p.dampening = dampening;
    p.weight_decay = weight_decay;
    p.nesterov = nesterov;
    p.maximize = maximize;
    p.inv_scale = scalar_ptr<float>(inv_scale);
    p.clip_coef = scalar_ptr<float>(clip_coef);
    p.skip = scalar_ptr<float>(skip);
    return cpu::sgd_step(t, p, layout_.plan);
  }

 private:
  Layout layout_;
  int dtype_;
  std::vector<void*> params_;
  std::vector<float*> buffer_, master_, initialized_;
};

class NormTable {
 public:
  NormTable(std::vector<int64_t> numel, int dtype, int64_t chunk_size, int max_tensors,
            int max_chunks)
      : layout_(std::move(numel), chunk_size, max_tensors, max_chunks), dtype_(dtype),
        partials_(static_cast<size_t>(layout_.plan.num_chunks())) {
    check_dtype(dtype);
  }

  int norm(const Addresses& tensors, uintptr_t inv_scale, uintptr_t out) {
    if (tensors.size() != layout_.size() || out == 0) return kOptimBadArgument;
    const std::vector<const void*> ptrs = as_pointers<const void*>(tensors);
    NormTensors t;
    t.num_tensors = static_cast<int64_t>(layout_.size());
    t.dtype = dtype_;
    t.numel = layout_.numel.data();
    t.tensors = ptrs.data();
    t.inv_scale = scalar_ptr<float>(inv_scale);
    t.out = reinterpret_cast<float*>(out);
    return cpu::l2norm(t, layout_.plan, partials_.data());
  }

 private:
  Layout layout_;
  int dtype_;
  std::vector<double> partials_;
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
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.attr("DEFAULT_CHUNK_SIZE") = kDefaultChunkSize;
  m.attr("DEFAULT_MAX_TENSORS") = kDefaultMaxTensors;
  m.attr("DEFAULT_MAX_CHUNKS") = kDefaultMaxChunks;

  py::class_<AdamTable>(m, "AdamTable", "Pointer table + chunk plan of one Adam bucket")
      .def(py::init<std::vector<int64_t>, int, const Addresses&, const Addresses&,
                    const Addresses&, const std::optional<Addresses>&,
                    const std::optional<Addresses>&, const Addresses&, int64_t, int, int>(),
           arg("numel"), arg("dtype"), arg("params"), arg("exp_avgs"), arg("exp_avg_sqs"),
           arg("max_exp_avg_sqs"), arg("master_params"), arg("steps"), arg("chunk_size"),
           arg("max_tensors"), arg("max_chunks"))
      .def("step", &AdamTable::step, no_gil, arg("grads"), arg("lr"), arg("lr_ptr"),
           arg("beta1"), arg("beta1_ptr"), arg("beta2"), arg("beta2_ptr"), arg("eps"),
           arg("weight_decay"), arg("amsgrad"), arg("maximize"), arg("decoupled"),
           arg("inv_scale"), arg("clip_coef"), arg("skip"));

  py::class_<SgdTable>(m, "SgdTable", "Pointer table + chunk plan of one SGD bucket")
      .def(py::init<std::vector<int64_t>, int, const Addresses&, const std::optional<Addresses>&,
                    const std::optional<Addresses>&, const Addresses&, int64_t, int, int>(),
           arg("numel"), arg("dtype"), arg("params"), arg("momentum_buffers"),
           arg("master_params"), arg("initialized"), arg("chunk_size"), arg("max_tensors"),
           arg("max_chunks"))
      .def("step", &SgdTable::step, no_gil, arg("grads"), arg("lr"), arg("lr_ptr"),
           arg("momentum"), arg("dampening"), arg("weight_decay"), arg("nesterov"),
           arg("maximize"), arg("inv_scale"), arg("clip_coef"), arg("skip"));

  py::class_<NormTable>(m, "NormTable", "Element counts + chunk plan of one norm pass")
      .def(py::init<std::vector<int64_t>, int, int64_t, int, int>(), arg("numel"),
           arg("dtype"), arg("chunk_size"), arg("max_tensors"), arg("max_chunks"))
      .def("norm", &NormTable::norm, no_gil, arg("tensors"), arg("inv_scale"), arg("out"));

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
