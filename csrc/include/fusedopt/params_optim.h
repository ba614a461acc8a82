// Plain parameter structs of the optimizer kernels (multi-tensor Adam/AdamW, SGD and the
// gradient-norm pass), shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) entry points.
//
// Conventions
// * Tensor lists are arrays of raw addresses, one entry per tensor, all of the same length
//   `num_tensors`; `numel[i]` elements of tensor i are walked as flat memory (the optimizer
//   layer guarantees params, grads, states and masters share one layout).
// * Params and grads have the storage dtype `dtype` (DType codes of dispatch.h); states,
//   masters and step counters are fp32.
// * A "device scalar" is a pointer to one fp32 value in the tensors' memory (a 0-dim
//   tensor), read when the kernel runs; nullptr means "absent".
// * A hyper-parameter given as a host value uses `value`; when its `ptr` is not null the
//   kernel reads the fp32 value behind it instead (a tensor lr/beta a scheduler may change
//   in place).
#pragma once
#include <cstdint>

namespace fusedopt {

// Status codes of the optimizer entry points (0 = success).
enum OptimStatus : int {
  kOptimOk = 0,
  kOptimBadDType = 1,     // dtype code is not 0/1/2
  kOptimBadArgument = 2,  // inconsistent sizes or limits (e.g. chunk_size <= 0)
};

struct ScalarArg {
  double value = 0.0;
  const float* ptr = nullptr;  // 0-dim fp32 device scalar, overrides `value`
};

struct AdamParams {
  ScalarArg lr, beta1, beta2;
  double eps = 0.0;
  double weight_decay = 0.0;
  bool amsgrad = false;
  bool maximize = false;
  bool decoupled = false;       // AdamW: p *= 1 - lr*wd; else Adam: g += wd*p
  const float* inv_scale = nullptr;  // device scalars, nullptr = 1
  const float* clip_coef = nullptr;
  const float* skip = nullptr;       // > 0: write nothing
};

struct AdamTensors {
  int64_t num_tensors = 0;
  int dtype = 0;                       // of params and grads
  const int64_t* numel = nullptr;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  float* const* exp_avg = nullptr;
  float* const* exp_avg_sq = nullptr;
  float* const* max_exp_avg_sq = nullptr;  // only with amsgrad
  float* const* master = nullptr;          // fp32 masters, or nullptr
  float* const* step = nullptr;            // 0-dim fp32 step counters
};

struct SgdParams {
  ScalarArg lr;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool maximize = false;
  const float* inv_scale = nullptr;
  const float* clip_coef = nullptr;
  const float* skip = nullptr;
};

struct SgdTensors {
  int64_t num_tensors = 0;
  int dtype = 0;
  const int64_t* numel = nullptr;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  float* const* momentum_buffer = nullptr;  // only with momentum != 0
  float* const* master = nullptr;           // fp32 masters, or nullptr
  float* const* initialized = nullptr;      // 0-dim fp32 flags: 1 once the buffer is set
};

struct NormTensors {
  int64_t num_tensors = 0;
  int dtype = 0;
  const int64_t* numel = nullptr;
  const void* const* tensors = nullptr;
  const float* inv_scale = nullptr;  // device scalar, nullptr = 1
  float* out = nullptr;              // fp32[2]: [sum of (g*inv_scale)^2, nonfinite flag]
};

}  // namespace fusedopt
