// Host entry points of the CPU vocab-parallel cross-entropy (csrc/cpu/vocab_parallel.cpp):
// the two per-shard passes over one rank's columns of logits split over the classes
// (contract: docs/architecture.md, "Vocab-parallel cross-entropy"). Torch-free: a params
// struct and a thread count in (<= 0: OpenMP's default), a LossStatus code out. Results
// never depend on the thread count. Included by csrc/bindings/cpu_vocab_parallel.cpp.
#pragma once
#include <cstdint>

#include "fusedopt/params_loss.h"

namespace fusedopt::cpu {

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

int vocab_parallel_row_stats(const VocabParallelParams& p, int num_threads);
int vocab_parallel_grad(const VocabParallelParams& p, int num_threads);

}  // namespace fusedopt::cpu
