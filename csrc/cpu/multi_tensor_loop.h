// The CPU side of the multi-tensor kernels: the OpenMP loop over a chunk plan and the ISA
// dispatch of the inner loops.
//
// Every launch of the plan is one worksharing loop over its chunks with a static schedule,
// inside a single parallel region; the launches need no barrier between them (`nowait`)
// because no chunk reads what another chunk writes. Which thread runs a chunk never changes
// a result: element-wise updates are independent, and reductions keep one partial per
// chunk (see multi_tensor.h). Plans of fewer than kParallelMinElements elements run on the
// calling thread: waking the pool costs more than the work (about 1 ns per element).
// The OpenMP runtime is the process's libgomp, which torch shares on Linux (same soname),
// so torch.set_num_threads also sets the threads of these loops.
//
// FO_CPU_CLONES compiles an inner loop three times -- for the x86-64-v4 level (AVX-512
// F/BW/DQ/VL), the x86-64-v3 level (AVX2 + FMA + F16C) and baseline x86-64 -- and picks one
// at load time (an ifunc); no -march=native is needed. The levels are used rather than the
// bare "avx512f"/"avx2" features because those do not include FMA, which the element math
// uses explicitly (fmaf, as torch's CPU kernels do); without FMA fmaf is a libm call, so the
// baseline clone is correct but slow. Results are the same in every clone: the build sets
// -ffp-contract=off, so only the explicit fmaf calls fuse. Elsewhere the macro is empty.
#pragma once
#include <cstdint>

#include "fusedopt/multi_tensor.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define FO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef FO_CPU_CLONES
#define FO_CPU_CLONES
#endif

namespace fusedopt::cpu {

constexpr int64_t kParallelMinElements = int64_t(1) << 17;

// Calls body(tensor, chunk, start, length) for every chunk of `plan`, in parallel.
template <typename Body>
void for_each_chunk(const MultiTensorPlan& plan, const int64_t* numel, const Body& body) {
  const bool parallel = plan.num_chunks() > 1 && plan.total_elements >= kParallelMinElements;
#pragma omp parallel if (parallel)
  for (const LaunchRange& launch : plan.launches) {
#pragma omp for schedule(static) nowait
    for (int64_t c = launch.chunk_begin; c < launch.chunk_end; ++c) {
      const int32_t t = plan.chunk_tensor(launch, c);
      body(t, c, plan.chunk_start[c], plan.chunk_length(c, numel[t]));
    }
  }
}

// A device scalar (nullptr = absent) read on the host: on CPU tensors this is a plain load.
inline float scalar_or(const float* ptr, float fallback) { return ptr ? *ptr : fallback; }

}  // namespace fusedopt::cpu
