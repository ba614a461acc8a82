// Parameters of the loss kernels (cross-entropy, softmax focal, sigmoid focal): plain
// structs of pointers, sizes, strides (in elements) and scalars, shared by the CPU and
// CUDA entry points. `scales` points to two fp32 values in the logits' memory space
// ([ce_scale, z_scale], docs/architecture.md "Losses"), read by the kernel, never by the
// host code that launches it.
#pragma once
#include <cstdint>

namespace fusedopt {

// Storage type of class-index targets (the Python launchers pass these codes).
enum class IndexType : int { kInt64 = 0, kInt32 = 1, kUInt8 = 2 };

// Error codes returned by the CPU entry points (0 = success).
enum LossStatus : int {
  kLossOk = 0,
  kLossBadDType = 1,
  kLossBadIndexType = 2,
  kLossBadShape = 3,
  kLossMissingAddress = 4,
};

struct CrossEntropyParams {
  const void* logits = nullptr;  // (n_rows, n_cols), class dim contiguous, dtype `dtype`
  int64_t logits_row_stride = 0;
  void* grad = nullptr;          // (n_rows, n_cols) of `dtype`, or nullptr: loss only;
  int64_t grad_row_stride = 0;   // may equal `logits` (in-place backward)
  float* row_loss = nullptr;     // (n_rows,) fp32
  const void* target = nullptr;  // (n_rows,) of `index_type`, or soft: (n_rows, n_cols) of `dtype`
  int64_t target_row_stride = 0; // soft targets only
  const float* weight = nullptr; // (n_cols,) fp32 or nullptr
  const float* scales = nullptr; // [ce_scale, z_scale]
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  int dtype = 0;                 // DType code (dispatch.h)
  int index_type = 0;            // IndexType code
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  float z_loss = 0.0f;
  float softcap = 0.0f;          // 0: no soft-capping
  bool soft_target = false;
};

struct FocalParams {
  const void* logits = nullptr;  // (n_rows, n_cols), class dim contiguous
  int64_t logits_row_stride = 0;
  void* grad = nullptr;          // (n_rows, n_cols) or nullptr: loss only
  int64_t grad_row_stride = 0;
  float* row_loss = nullptr;     // (n_rows,) fp32
  const void* target = nullptr;  // (n_rows,) of `index_type`
  const float* alpha = nullptr;  // (n_cols,) fp32 or nullptr (alpha_c = 1)
  const float* scales = nullptr; // [scale, unused]
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  int dtype = 0;
  int index_type = 0;
  int64_t ignore_index = -100;
  float gamma = 2.0f;
  float label_smoothing = 0.0f;
};

struct SigmoidFocalParams {
  const void* logits = nullptr;  // n contiguous values of `dtype`
  const void* target = nullptr;  // n contiguous values of `dtype`
  void* loss = nullptr;          // reduce: n_partials fp32; else n values of `dtype`
  void* grad = nullptr;          // n values of `dtype`, or nullptr
  const float* scales = nullptr; // [scale, unused]
  int64_t n = 0;
  int dtype = 0;
  float alpha = 0.25f;           // < 0: no class balance
  float gamma = 2.0f;
  float label_smoothing = 0.0f;
  bool reduce = false;
};

// Elements summed into one partial sum of the reduced sigmoid focal loss (a fixed span,
// so the partial sums do not depend on the number of threads or blocks).
constexpr int64_t kSigmoidFocalSpan = 4096;

inline int64_t sigmoid_focal_partials(int64_t n) {
  return (n + kSigmoidFocalSpan - 1) / kSigmoidFocalSpan;
}

}  // namespace fusedopt
