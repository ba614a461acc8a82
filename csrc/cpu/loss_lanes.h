// Building blocks of the CPU loss kernels: rows walked in blocks of kLanes values held in
// small fp32 arrays, so that g++ vectorises every per-lane loop (one zmm register with
// AVX-512, two ymm with AVX2) without reassociating anything: each lane keeps its own
// accumulators and the lanes are combined in a fixed order at the end of a row, so a
// result never depends on the ISA's vector width or on the thread that computed it.
//
// FO_LOSS_CLONES compiles a row kernel three times -- x86-64-v4 (AVX-512), x86-64-v3
// (AVX2) and baseline x86-64 -- and picks one when the module loads (an ifunc on the
// CPU's feature bits), so no -march=native is needed. Elsewhere it is empty.
// tests/backends/test_cpu_isas.py checks that every clone gives the same bits, by
// forcing each clone of the built extension through its ifunc slot in turn.
// The OpenMP loops stay outside the cloned functions (an outlined parallel region would
// not inherit the clone's ISA).
#pragma once
#include <cstdint>
#include <cstring>

#include "fusedopt/dispatch.h"
#include "fusedopt/math.h"
#include "fusedopt/params_loss.h"

#if !defined(FO_LOSS_CLONES) && defined(__x86_64__) && defined(__GNUC__) && \
    !defined(__clang__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define FO_LOSS_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef FO_LOSS_CLONES
#define FO_LOSS_CLONES
#endif

#define FO_LANES_INLINE inline __attribute__((always_inline))

namespace fusedopt::cpu {

constexpr int kLanes = 16;

// Rows (or spans) below this many elements in total run on the calling thread only.
constexpr int64_t kParallelMinWork = int64_t(1) << 15;

inline int resolve_threads(int num_threads, int64_t tasks, int64_t work) {
  if (tasks <= 1 || work < kParallelMinWork) return 1;
  return num_threads > 0 ? num_threads : 0;
}

// Calls body(i) for i in [0, n), in parallel with a static schedule when worth it.
template <typename Body>
void parallel_for(int64_t n, int64_t work, int num_threads, const Body& body) {
  const int threads = resolve_threads(num_threads, n, work);
  if (threads == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  if (threads > 0) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

// Class index of one row as int64 (any value, checked by the caller).
inline int64_t load_index(const void* target, int index_type, int64_t row) {
  switch (static_cast<IndexType>(index_type)) {
    case IndexType::kInt32: return static_cast<const int32_t*>(target)[row];
    case IndexType::kUInt8: return static_cast<const uint8_t*>(target)[row];
    default: return static_cast<const int64_t*>(target)[row];
  }
}

inline bool valid_index_type(int code) { return code >= 0 && code <= 2; }
inline bool valid_dtype(int code) { return code >= 0 && code <= 2; }

// kLanes values of a row in fp32 (soft-capped with kCap).
template <bool kCap, typename T>
FO_LANES_INLINE void load_lanes(const T* src, float cap, float* x) {
  for (int l = 0; l < kLanes; ++l) x[l] = to_float(src[l]);
  if (kCap)
    for (int l = 0; l < kLanes; ++l) x[l] = loss_math::softcap_value(x[l], cap);
}

// The first n < kLanes values of a row; the other lanes get `fill`.
template <bool kCap, typename T>
FO_LANES_INLINE void load_tail(const T* src, int64_t n, float cap, float fill, float* x) {
  for (int l = 0; l < kLanes; ++l) {
    float v = fill;
    if (l < n) v = kCap ? loss_math::softcap_value(to_float(src[l]), cap) : to_float(src[l]);
    x[l] = v;
  }
}

template <typename T>
FO_LANES_INLINE void store_lanes(T* dst, const float* v) {
  for (int l = 0; l < kLanes; ++l) dst[l] = from_float<T>(v[l]);
}

template <typename T>
FO_LANES_INLINE void store_tail(T* dst, int64_t n, const float* v) {
  for (int64_t l = 0; l < n; ++l) dst[l] = from_float<T>(v[l]);
}

template <typename T>
inline void fill_row(T* dst, int64_t n, float value) {
  const T v = from_float<T>(value);
  for (int64_t j = 0; j < n; ++j) dst[j] = v;
}

// Lane-wise online log-sum-exp of a row.
struct LaneLse {
  float m[kLanes];
  float d[kLanes];

  FO_LANES_INLINE LaneLse() {
    for (int l = 0; l < kLanes; ++l) {
      m[l] = -loss_math::kInf;
      d[l] = 0.0f;
    }
  }
  // -inf lanes (the padding of a tail) add nothing.
  FO_LANES_INLINE void fold(const float* x) {
    for (int l = 0; l < kLanes; ++l) loss_math::lse_fold(m[l], d[l], x[l]);
  }
  // Row max and sum_j exp(x_j - row max), lanes merged in order (NaN for a +inf max).
  FO_LANES_INLINE void finish(float& row_max, float& sum) const {
    float mm = m[0], dd = d[0];
    for (int l = 1; l < kLanes; ++l) loss_math::lse_merge(mm, dd, m[l], d[l]);
    row_max = mm;
    sum = loss_math::lse_sum_at_max(mm, dd);
  }
};

// Sum of kLanes partial sums in a fixed order.
FO_LANES_INLINE float lane_sum(const float* v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// weight + j, or nullptr without weights.
FO_LANES_INLINE const float* at(const float* weight, int64_t j) {
  return weight ? weight + j : nullptr;
}

// Lane index of class y in the block starting at column j, or -1.
FO_LANES_INLINE int lane_of(int64_t y, int64_t j) {
  const int64_t off = y - j;
  return (off >= 0 && off < kLanes) ? int(off) : -1;
}

}  // namespace fusedopt::cpu
