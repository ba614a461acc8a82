// Host entry point of the CPU lean Adam kernel (csrc/cpu/lean_adam.cpp). Torch-free: raw
// pointers, sizes and a chunk plan in, an OptimStatus code out. Included by the bindings.
#pragma once
#include "fusedopt/multi_tensor.h"
#include "fusedopt/params_lean.h"

namespace fusedopt::cpu {

// One lean Adam/AdamW step over the tensors of `plan` (made from `t.numel`); see
// params_lean.h. 8-bit states need plan.chunk_size to be a multiple of 256.
int lean_adam_step(const LeanAdamTensors& t, const LeanAdamParams& p, const MultiTensorPlan& plan);

}  // namespace fusedopt::cpu
