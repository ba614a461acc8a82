// Host entry points of the CPU optimizer kernels (csrc/cpu/adam.cpp, sgd.cpp, l2norm.cpp).
// Torch-free: raw pointers, sizes and a chunk plan in, an OptimStatus code out. Included by
// the bindings (csrc/bindings/cpu_optim.cpp).
#pragma once
#include "fusedopt/multi_tensor.h"
#include "fusedopt/params_optim.h"

namespace fusedopt::cpu {

// One Adam/AdamW step over the tensors of `plan` (made from `t.numel`); see params_optim.h.
int adam_step(const AdamTensors& t, const AdamParams& p, const MultiTensorPlan& plan);

// One SGD step over the tensors of `plan`.
int sgd_step(const SgdTensors& t, const SgdParams& p, const MultiTensorPlan& plan);

// t.out = [sum of (x*inv_scale)^2 over every element, 1 if any element is inf/NaN else 0].
// `partials` is scratch space of plan.num_chunks() doubles.
int l2norm(const NormTensors& t, const MultiTensorPlan& plan, double* partials);

}  // namespace fusedopt::cpu
