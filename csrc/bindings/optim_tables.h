// The pointer tables of the optimizer kernels, shared by fusedopt._cpu and fusedopt._cuda.
//
// A bucket's pointer table is a C++ object built once from the addresses of the tensors
// that persist from step to step (params, states, masters, step counters / flags) and
// their element counts, together with its chunk plan (multi_tensor.h); each step passes only
// the gradient addresses and the scalars. Addresses are plain integers (uintptr_t), device
// scalars are addresses too (0 = absent). `Kernels` runs the step:
//   static constexpr int kBadArgument;        status for inconsistent arguments
//   static constexpr bool kHostPartials;      the norm's partials live in the table (cpu)
//                                             or in caller-given device scratch (cuda)
//   static int adam(const AdamTensors&, const AdamParams&, const MultiTensorPlan&,
//                   uintptr_t stream);
//   static int sgd(const SgdTensors&, const SgdParams&, const MultiTensorPlan&,
//                  uintptr_t stream);
//   static int norm(const NormTensors&, const MultiTensorPlan&, double* partials,
//                   uintptr_t stream);
// and register_optim_tables<Kernels>(m) binds the three table classes.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/params_optim.h"

namespace fusedopt::bind {
namespace optim_tables {

namespace py = pybind11;

using Addresses = std::vector<uintptr_t>;

template <typename P>
std::vector<P> as_pointers(const Addresses& a) {
  std::vector<P> out(a.size());
  for (size_t i = 0; i < a.size(); ++i) out[i] = reinterpret_cast<P>(a[i]);
  return out;
}

template <typename P>
const P* scalar_ptr(uintptr_t a) { return reinterpret_cast<const P*>(a); }

inline void check_length(const char* name, size_t got, size_t expected) {
  if (got != expected)
    throw py::value_error(std::string(name) + " has " + std::to_string(got) +
                          " addresses, expected " + std::to_string(expected));
}

inline void check_dtype(int dtype) {
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

template <class Kernels>
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
           uintptr_t skip, uintptr_t stream) {
    if (grads.size() != layout_.size()) return Kernels::kBadArgument;
    if (amsgrad && max_exp_avg_sq_.empty() && layout_.size() > 0) return Kernels::kBadArgument;
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
    return Kernels::adam(t, p, layout_.plan, stream);
  }

 private:
  Layout layout_;
  int dtype_;
  std::vector<void*> params_;
  std::vector<float*> exp_avg_, exp_avg_sq_, max_exp_avg_sq_, master_, step_;
};

template <class Kernels>
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
           uintptr_t inv_scale, uintptr_t clip_coef, uintptr_t skip, uintptr_t stream) {
    if (grads.size() != layout_.size()) return Kernels::kBadArgument;
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
    return Kernels::sgd(t, p, layout_.plan, stream);
  }

 private:
  Layout layout_;
  int dtype_;
  std::vector<void*> params_;
  std::vector<float*> buffer_, master_, initialized_;
};

template <class Kernels>
class NormTable {
 public:
  NormTable(std::vector<int64_t> numel, int dtype, int64_t chunk_size, int max_tensors,
            int max_chunks)
      : layout_(std::move(numel), chunk_size, max_tensors, max_chunks), dtype_(dtype),
        partials_(Kernels::kHostPartials ? static_cast<size_t>(layout_.plan.num_chunks()) : 0) {
    check_dtype(dtype);
  }

  // Chunks of the plan: the number of doubles of device scratch a CUDA norm needs.
  int64_t num_chunks() const { return layout_.plan.num_chunks(); }

  int norm(const Addresses& tensors, uintptr_t inv_scale, uintptr_t out, uintptr_t scratch,
           uintptr_t stream) {
    if (tensors.size() != layout_.size() || out == 0) return Kernels::kBadArgument;
    const std::vector<const void*> ptrs = as_pointers<const void*>(tensors);
    NormTensors t;
    t.num_tensors = static_cast<int64_t>(layout_.size());
    t.dtype = dtype_;
    t.numel = layout_.numel.data();
    t.tensors = ptrs.data();
    t.inv_scale = scalar_ptr<float>(inv_scale);
    t.out = reinterpret_cast<float*>(out);
    double* partials =
        Kernels::kHostPartials ? partials_.data() : reinterpret_cast<double*>(scratch);
    return Kernels::norm(t, layout_.plan, partials, stream);
  }

 private:
  Layout layout_;
  int dtype_;
  std::vector<double> partials_;
};


template <class Kernels>
void register_optim_tables(py::module_& m) {
  using py::arg;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  py::class_<AdamTable<Kernels>>(m, "AdamTable", "Pointer table + chunk plan of one Adam bucket")
      .def(py::init<std::vector<int64_t>, int, const Addresses&, const Addresses&,
                    const Addresses&, const std::optional<Addresses>&,
                    const std::optional<Addresses>&, const Addresses&, int64_t, int, int>(),
           arg("numel"), arg("dtype"), arg("params"), arg("exp_avgs"), arg("exp_avg_sqs"),
           arg("max_exp_avg_sqs"), arg("master_params"), arg("steps"), arg("chunk_size"),
           arg("max_tensors"), arg("max_chunks"))
      .def("step", &AdamTable<Kernels>::step, no_gil, arg("grads"), arg("lr"), arg("lr_ptr"),
           arg("beta1"), arg("beta1_ptr"), arg("beta2"), arg("beta2_ptr"), arg("eps"),
           arg("weight_decay"), arg("amsgrad"), arg("maximize"), arg("decoupled"),
           arg("inv_scale"), arg("clip_coef"), arg("skip"), arg("stream") = uintptr_t(0));

  py::class_<SgdTable<Kernels>>(m, "SgdTable", "Pointer table + chunk plan of one SGD bucket")
      .def(py::init<std::vector<int64_t>, int, const Addresses&, const std::optional<Addresses>&,
                    const std::optional<Addresses>&, const Addresses&, int64_t, int, int>(),
           arg("numel"), arg("dtype"), arg("params"), arg("momentum_buffers"),
           arg("master_params"), arg("initialized"), arg("chunk_size"), arg("max_tensors"),
           arg("max_chunks"))
      .def("step", &SgdTable<Kernels>::step, no_gil, arg("grads"), arg("lr"), arg("lr_ptr"),
           arg("momentum"), arg("dampening"), arg("weight_decay"), arg("nesterov"),
           arg("maximize"), arg("inv_scale"), arg("clip_coef"), arg("skip"),
           arg("stream") = uintptr_t(0));

  py::class_<NormTable<Kernels>>(m, "NormTable", "Element counts + chunk plan of one norm pass")
      .def(py::init<std::vector<int64_t>, int, int64_t, int, int>(), arg("numel"),
           arg("dtype"), arg("chunk_size"), arg("max_tensors"), arg("max_chunks"))
      .def_property_readonly("num_chunks", &NormTable<Kernels>::num_chunks)
      .def("norm", &NormTable<Kernels>::norm, no_gil, arg("tensors"), arg("inv_scale"),
           arg("out"), arg("scratch") = uintptr_t(0), arg("stream") = uintptr_t(0));
}

}  // namespace optim_tables

using optim_tables::Layout;
using optim_tables::register_optim_tables;

}  // namespace fusedopt::bind
