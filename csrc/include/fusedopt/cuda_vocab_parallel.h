// Host entry points of the CUDA vocab-parallel cross-entropy (csrc/cuda/vocab_parallel.cu):
// the two per-shard passes over one rank's columns of logits split over the classes
// (contract: docs/architecture.md, "Vocab-parallel cross-entropy"). Torch-free: the params
// struct of params_vocab_parallel.h (the one the cpu kernels take) and a cudaStream_t in,
// cudaError_t out -- cudaErrorInvalidValue for anything check_vocab_parallel refuses,
// before anything is launched. Everything is enqueued on `stream`; no device value is read
// on the host. Zero rows launch nothing. Kernels run on the device current to the calling
// thread, which must be the device of `stream`.
#pragma once
#include <cuda_runtime.h>

#include "fusedopt/params_vocab_parallel.h"

namespace fusedopt::cuda {

cudaError_t vocab_parallel_row_stats(const VocabParallelParams& p, cudaStream_t stream);
cudaError_t vocab_parallel_grad(const VocabParallelParams& p, cudaStream_t stream);

}  // namespace fusedopt::cuda
