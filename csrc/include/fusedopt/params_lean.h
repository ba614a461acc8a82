// Plain parameter structs of the lean Adam step (bf16 or 8-bit states, stochastic rounding
// of low-precision params), shared by the CPU (csrc/cpu/lean_adam.cpp) and CUDA
// (csrc/cuda/lean_adam.cu) entry points. Conventions as in params_optim.h: lists of raw
// addresses of length num_tensors, numel[i] elements of tensor i walked as flat memory,
// device scalars as pointers to fp32 values (nullptr = absent).
#pragma once
#include <cstdint>

#include "fusedopt/params_optim.h"

namespace fusedopt {

// Storage of exp_avg / exp_avg_sq.
enum LeanState : int {
  kLeanStateF32 = 0,   // fp32, fp32
  kLeanStateBF16 = 1,  // bf16, bf16 (stochastic rounding)
  kLeanStateQ8 = 2,    // int8 / uint8 codes + one fp32 absmax per 256 elements each
};

struct LeanAdamParams {
  ScalarArg lr, beta1, beta2;
  double eps = 0.0;
  double weight_decay = 0.0;
  bool maximize = false;
  bool decoupled = false;          // AdamW: p *= 1 - lr*wd; else Adam: g += wd*p
  bool stochastic_params = false;  // bf16/fp16 params without master: stochastic rounding
  uint32_t seed = 0;
  const float* inv_scale = nullptr;  // device scalars, nullptr = 1
  const float* clip_coef = nullptr;
  const float* skip = nullptr;       // > 0: write nothing
};

struct LeanAdamTensors {
  int64_t num_tensors = 0;
  int dtype = 0;        // of params and grads (DType of dispatch.h)
  int state = 0;        // LeanState
  const int64_t* numel = nullptr;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* exp_avg = nullptr;             // float / bf16 / int8 codes
  void* const* exp_avg_sq = nullptr;          // float / bf16 / uint8 codes
  float* const* exp_avg_absmax = nullptr;     // kLeanStateQ8: ceil(numel / 256) each
  float* const* exp_avg_sq_absmax = nullptr;  // kLeanStateQ8
  float* const* master = nullptr;             // fp32 masters, or nullptr
  float* const* step = nullptr;               // 0-dim fp32 step counters
  const uint32_t* stream = nullptr;           // per-tensor random stream ids
};

}  // namespace fusedopt
