// The 8-bit passes of the CPU lean Adam kernel, one 256-element block at a time:
//   decode_block: codes + absmax -> fp32 moments
//   encode_block: fp32 moments + new absmax -> codes
// with exactly the operations of math_lean.h (dynamic_value / dynamic_code), in two
// versions giving the same bits: portable loops (auto-vectorised; the byte widening and
// narrowing in loops of their own, so that the arithmetic runs 16 fp32 lanes wide), and
// AVX-512 code that looks the per-level constants up with in-register permutes. The
// AVX-512 versions (these and lean_dense.h's) run when the CPU has AVX-512 F/BW/DQ/VL,
// unless set_portable_blocks(true) (tests compare the two).
#pragma once
#include <cstdint>

#include "fusedopt/math_lean.h"

namespace fusedopt::cpu::lean_blocks {

// Decodes n <= 256 codes: m[j] = signed value(m_codes[j]) * m_absmax, v likewise.
void decode_block(const int8_t* m_codes, const uint8_t* v_codes, float m_absmax, float v_absmax,
                  float* m, float* v, int n);

// Encodes n <= 256 moments with the block's stored absmax (block_absmax()); blocks without
// codes (absmax 0 or NaN) get zeros.
void encode_block(const float* m, const float* v, float m_absmax, float v_absmax,
                  int8_t* m_codes, uint8_t* v_codes, int n);

// The whole step of one block with fp32 params (decode, update, absmax, encode) in one
// AVX-512 pass over the elements plus the encode pass; false (nothing done) when the
// AVX-512 paths are off.
bool update_block_fp32(float* param, const float* grad, int8_t* m_codes, uint8_t* v_codes,
                       float* m_absmax, float* v_absmax, int n, const lean::LeanAdamCoefs& c,
                       const GradTransform& gt, bool l2, bool transform);

// Forces the portable passes (true) or lets the CPU's features decide (false).
void set_portable_blocks(bool portable);
bool uses_avx512_blocks();

}  // namespace fusedopt::cpu::lean_blocks
