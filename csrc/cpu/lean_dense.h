// The AVX-512 loop of the CPU lean Adam kernel for fp32 params with bf16 moments
// (lean_dense.cpp), the case the compiler vectorises worst (mixed 16/32-bit lanes). Runs
// when the 8-bit passes run their AVX-512 version too (lean_blocks.h: the CPU has AVX-512
// F/BW/DQ/VL and the portable paths are not forced); same bits as the portable loop.
#pragma once
#include <cstdint>

#include "fusedopt/math_lean.h"

namespace fusedopt::cpu::lean_dense {

// One chunk of n elements; `start` is lo32 of the chunk's first element index and
// `state_high` the chunk's high_key() of the moment bits. Returns false (nothing done) when
// the AVX-512 path is not available or not enabled.
bool bf16_moments_fp32_params(float* param, const float* grad, uint16_t* m16, uint16_t* v16,
                              int64_t n, const lean::LeanAdamCoefs& c, const GradTransform& gt,
                              bool l2, bool transform, uint32_t state_high, uint32_t start);

}  // namespace fusedopt::cpu::lean_dense
