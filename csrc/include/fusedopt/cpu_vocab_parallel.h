// Host entry points of the CPU vocab-parallel cross-entropy (csrc/cpu/vocab_parallel.cpp):
// the two per-shard passes over one rank's columns of logits split over the classes
// (contract: docs/architecture.md, "Vocab-parallel cross-entropy"). Torch-free: the params
// struct of params_vocab_parallel.h (the one the cuda kernels take) and a thread count in
// (<= 0: OpenMP's default), a LossStatus code out. Results never depend on the thread
// count. Included by csrc/bindings/cpu_vocab_parallel.cpp.
#pragma once

#include "fusedopt/params_vocab_parallel.h"

namespace fusedopt::cpu {

int vocab_parallel_row_stats(const VocabParallelParams& p, int num_threads);
int vocab_parallel_grad(const VocabParallelParams& p, int num_threads);

}  // namespace fusedopt::cpu
