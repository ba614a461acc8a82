// The pointer table of the lean Adam kernels (bf16 / 8-bit states, stochastic rounding),
// shared by fusedopt._cpu and fusedopt._cuda like the tables of optim_tables.h: built once
// per bucket from the addresses of the tensors that persist between steps (params, moments,
// absmax lists, masters, step counters), their element counts, the per-tensor random
// stream ids and the chunk plan; a step passes the gradient addresses and the scalars.
// `Kernels` (see optim_tables.h) also provides
//   static int lean_adam(const LeanAdamTensors&, const LeanAdamParams&,
//                        const MultiTensorPlan&, uintptr_t stream);
// register_lean_tables<Kernels>(m) binds LeanAdamTable.
#pragma once
#include "fusedopt/params_lean.h"
#include "optim_tables.h"

namespace fusedopt::bind {
namespace optim_tables {

constexpr int64_t kLeanQuantBlock = 256;

template <class Kernels>
class LeanAdamTable {
 public:
  LeanAdamTable(std::vector<int64_t> numel, int dtype, int state, const Addresses& params,
                const Addresses& exp_avgs, const Addresses& exp_avg_sqs,
                const std::optional<Addresses>& exp_avg_absmaxes,
                const std::optional<Addresses>& exp_avg_sq_absmaxes,
                const std::optional<Addresses>& masters, const Addresses& steps,
                std::vector<uint32_t> streams, int64_t chunk_size, int max_tensors,
                int max_chunks)
      : layout_(std::move(numel), chunk_size, max_tensors, max_chunks),
        dtype_(dtype),
        state_(state),
        streams_(std::move(streams)) {
    check_dtype(dtype);
    if (state < kLeanStateF32 || state > kLeanStateQ8)
      throw py::value_error("state code must be 0 (f32), 1 (bf16) or 2 (8-bit), got " +
                            std::to_string(state));
    const size_t n = layout_.size();
    check_length("params", params.size(), n);
    check_length("exp_avgs", exp_avgs.size(), n);
    check_length("exp_avg_sqs", exp_avg_sqs.size(), n);
    check_length("steps", steps.size(), n);
    check_length("streams", streams_.size(), n);
    params_ = as_pointers<void*>(params);
    exp_avg_ = as_pointers<void*>(exp_avgs);
    exp_avg_sq_ = as_pointers<void*>(exp_avg_sqs);
    step_ = as_pointers<float*>(steps);
    if (state == kLeanStateQ8) {
      if (!exp_avg_absmaxes || !exp_avg_sq_absmaxes)
        throw py::value_error("8-bit states need exp_avg_absmaxes and exp_avg_sq_absmaxes");
      if (chunk_size % kLeanQuantBlock != 0)
        throw py::value_error("8-bit states need a chunk_size that is a multiple of 256, got " +
                              std::to_string(chunk_size));
      check_length("exp_avg_absmaxes", exp_avg_absmaxes->size(), n);
      check_length("exp_avg_sq_absmaxes", exp_avg_sq_absmaxes->size(), n);
      m_absmax_ = as_pointers<float*>(*exp_avg_absmaxes);
      v_absmax_ = as_pointers<float*>(*exp_avg_sq_absmaxes);
    }
    if (masters) {
      check_length("master_params", masters->size(), n);
      master_ = as_pointers<float*>(*masters);
    }
  }

  int step(const Addresses& grads, double lr, uintptr_t lr_ptr, double beta1, uintptr_t beta1_ptr,
           double beta2, uintptr_t beta2_ptr, double eps, double weight_decay, bool maximize,
           bool decoupled, bool stochastic_params, uint32_t seed, uintptr_t inv_scale,
           uintptr_t clip_coef, uintptr_t skip, uintptr_t stream) {
    if (grads.size() != layout_.size()) return Kernels::kBadArgument;
    const std::vector<const void*> grad_ptrs = as_pointers<const void*>(grads);
    LeanAdamTensors t;
    t.num_tensors = static_cast<int64_t>(layout_.size());
    t.dtype = dtype_;
    t.state = state_;
    t.numel = layout_.numel.data();
    t.params = params_.data();
    t.grads = grad_ptrs.data();
    t.exp_avg = exp_avg_.data();
    t.exp_avg_sq = exp_avg_sq_.data();
    t.exp_avg_absmax = m_absmax_.empty() ? nullptr : m_absmax_.data();
    t.exp_avg_sq_absmax = v_absmax_.empty() ? nullptr : v_absmax_.data();
    t.master = master_.empty() ? nullptr : master_.data();
    t.step = step_.data();
    t.stream = streams_.data();
    LeanAdamParams p;
    p.lr = {lr, scalar_ptr<float>(lr_ptr)};
    p.beta1 = {beta1, scalar_ptr<float>(beta1_ptr)};
    p.beta2 = {beta2, scalar_ptr<float>(beta2_ptr)};
    p.eps = eps;
    p.weight_decay = weight_decay;
    p.maximize = maximize;
    p.decoupled = decoupled;
    p.stochastic_params = stochastic_params;
    p.seed = seed;
    p.inv_scale = scalar_ptr<float>(inv_scale);
    p.clip_coef = scalar_ptr<float>(clip_coef);
    p.skip = scalar_ptr<float>(skip);
    return Kernels::lean_adam(t, p, layout_.plan, stream);
  }

 private:
  Layout layout_;
  int dtype_, state_;
  std::vector<uint32_t> streams_;
  std::vector<void*> params_, exp_avg_, exp_avg_sq_;
  std::vector<float*> m_absmax_, v_absmax_, master_, step_;
};

template <class Kernels>
void register_lean_tables(py::module_& m) {
  using py::arg;
  py::class_<LeanAdamTable<Kernels>>(m, "LeanAdamTable",
                                     "Pointer table + chunk plan of one lean Adam bucket")
      .def(py::init<std::vector<int64_t>, int, int, const Addresses&, const Addresses&,
                    const Addresses&, const std::optional<Addresses>&,
                    const std::optional<Addresses>&, const std::optional<Addresses>&,
                    const Addresses&, std::vector<uint32_t>, int64_t, int, int>(),
           arg("numel"), arg("dtype"), arg("state"), arg("params"), arg("exp_avgs"),
           arg("exp_avg_sqs"), arg("exp_avg_absmaxes"), arg("exp_avg_sq_absmaxes"),
           arg("master_params"), arg("steps"), arg("streams"), arg("chunk_size"),
           arg("max_tensors"), arg("max_chunks"))
      .def("step", &LeanAdamTable<Kernels>::step, py::call_guard<py::gil_scoped_release>(),
           arg("grads"), arg("lr"), arg("lr_ptr"), arg("beta1"), arg("beta1_ptr"), arg("beta2"),
           arg("beta2_ptr"), arg("eps"), arg("weight_decay"), arg("maximize"), arg("decoupled"),
           arg("stochastic_params"), arg("seed"), arg("inv_scale"), arg("clip_coef"),
           arg("skip"), arg("stream") = uintptr_t(0));
}

}  // namespace optim_tables

using optim_tables::register_lean_tables;

}  // namespace fusedopt::bind
