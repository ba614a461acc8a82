// Parameters of the vocab-parallel cross-entropy kernels (cpu: csrc/cpu/vocab_parallel.cpp,
// cuda: csrc/cuda/vocab_parallel.cu): the two per-shard passes over one rank's columns of
// logits split over the classes (contract: docs/architecture.md, "Vocab-parallel
// cross-entropy"). A plain struct of addresses, sizes, strides (in elements) and scalars,
// and the one check of it both backends run before touching memory.
#pragma once
#include <cstdint>

#include "fusedopt/params_loss.h"

namespace fusedopt {

// Row statistics [max, sum exp(x - max), target part, smoothing part] and the combined
// gradient coefficients [row_max, log_sum, a, b, c]: fp32 values per row.
constexpr int kVocabStatsWidth = 4;
constexpr int kVocabCoefsWidth = 5;

struct VocabParallelParams {
  const void* logits = nullptr;  // (n_rows, n_cols), rows logits_row_stride apart
  int64_t logits_row_stride = 0;
  const void* target = nullptr;  // class indices (n_rows,) of index_type, or soft targets
  int64_t target_row_stride = 0;  // (soft targets: the logits' dtype, rows this far apart)
  const float* weight = nullptr;  // this rank's (n_cols,) slice of the class weights, or null
  float* stats = nullptr;         // (n_rows, 4), written by vocab_parallel_row_stats
  const float* coefs = nullptr;   // (n_rows, 5), read by vocab_parallel_grad
  void* grad = nullptr;           // (n_rows, n_cols) in the logits' dtype (may be the logits)
  int64_t grad_row_stride = 0;
  int64_t n_rows = 0;
  int64_t n_cols = 0;             // this rank's classes: [class_offset, class_offset + n_cols)
  int64_t class_offset = 0;
  int64_t num_classes = 0;        // of the whole vocabulary
  int64_t ignore_index = -100;
  int dtype = 0;                  // dispatch.h codes
  int index_type = 0;             // IndexType
  float label_smoothing = 0.0f;
  float softcap = 0.0f;           // <= 0: none
  bool soft_target = false;
};

enum class VocabParallelPass { kRowStats, kGrad };

// kLossOk, or the LossStatus of the first thing a kernel of `pass` could not walk safely:
// a dtype or index-type code, a size or a class range outside the vocabulary, rows closer
// than n_cols apart, or a missing address. Nothing is dereferenced.
inline int check_vocab_parallel(const VocabParallelParams& p, VocabParallelPass pass) {
  if (p.dtype < 0 || p.dtype > 2) return kLossBadDType;
  if (!p.soft_target && (p.index_type < 0 || p.index_type > 2)) return kLossBadIndexType;
  if (p.n_rows < 0 || p.n_cols < 1 || p.class_offset < 0 || p.num_classes < p.n_cols ||
      p.class_offset > p.num_classes - p.n_cols)
    return kLossBadShape;
  const bool grad = pass == VocabParallelPass::kGrad;
  if (p.n_rows > 1 && (p.logits_row_stride < p.n_cols ||
                       (p.soft_target && p.target_row_stride < p.n_cols) ||
                       (grad && p.grad_row_stride < p.n_cols)))
    return kLossBadShape;
  if (p.logits == nullptr || p.target == nullptr ||
      (grad ? (p.coefs == nullptr || p.grad == nullptr) : p.stats == nullptr))
    return kLossMissingAddress;
  return kLossOk;
}

}  // namespace fusedopt
