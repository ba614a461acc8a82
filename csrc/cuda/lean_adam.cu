// Multi-tensor lean Adam / AdamW step on CUDA tensors: bf16 or 8-bit moments, stochastic
// rounding of bf16/fp16 params.
//
// Math (fusedopt/math_lean.h, the one copy shared with the cpu backend; every operation a
// separately rounded fp32 operation -- __fmul_rn/__fadd_rn/__fdiv_rn/__fsqrt_rn, so nvcc
// contracts nothing -- hence the same bits as the cpu, triton and torch backends):
//   g' = ((g * inv_scale) * clip_coef) * (maximize ? -1 : 1)
//   AdamW: p = p * (1 - lr*wd)      Adam: g' = g' + wd*p
//   m = b1*m + (1-b1)*g'            v = b2*v + (1-b2)*(g'*g')
//   p = p + (-lr/(1-b1^t) * m) / (sqrt(v) * (1/sqrt(1-b2^t)) + eps),   t = step + 1
// Thread 0 of a block forms the tensor's coefficients (double, rounded once) and random keys
// and shares them through shared memory. skip > 0: every block returns before any access,
// and the counter launch writes nothing.
//
// Launches (multi_tensor_apply.cuh): one block of 512 threads per chunk of 65536 elements,
// then the step counters. fp32/bf16 moments: groups of 4 consecutive elements per thread
// (vector accesses when aligned). 8-bit moments: one warp per 256-element block, 8
// consecutive elements per lane; the block's new absmax is a warp max (shuffles) of the
// magnitude bits, then each lane encodes its 8 elements.
//
// Memory traffic per element (B = bytes of the param dtype): reads g, p (2B) + moments,
// writes p (B) + moments: fp32 moments 8 + 8 bytes, bf16 4 + 4, 8-bit 2 + 2 (+ 8 bytes of
// absmax per 256 elements each way); a master adds 4 + 4 and replaces the param read.
#include <type_traits>

#include "fusedopt/cuda_lean.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math_lean.h"
#include "multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

using namespace fusedopt::lean;

enum LeanList { kParam, kGrad, kExpAvg, kExpAvgSq, kMAbsmax, kVAbsmax, kMaster, kStep, kStream,
                kLeanLists };
enum ParamStore { kNearest, kStochastic, kFromMaster };

struct LeanArgs {
  ScalarArg lr, beta1, beta2;
  double eps, weight_decay;
  bool decoupled, l2;
  float sign;
  uint32_t seed;
  const float* inv_scale;
  const float* clip_coef;
  const float* skip;
};

struct SharedCoefs {
  LeanAdamCoefs c;
  GradTransform gt;
  uint32_t param_high, state_high;
};

__device__ __forceinline__ double read(const ScalarArg& a) {
  return a.ptr ? static_cast<double>(*a.ptr) : a.value;
}

// 4 consecutive 16-bit words, one 8-byte store when whole (see store_group).
__device__ __forceinline__ void store_bits_group(uint16_t* x, int64_t first, int64_t n,
                                                 bool whole, const uint16_t (&b)[kIlp]) {
  if (whole) {
    Group<uint16_t> g;
#pragma unroll
    for (int k = 0; k < kIlp; ++k) g.lane[k] = b[k];
    *reinterpret_cast<Group<uint16_t>*>(x + first) = g;
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k)
      if (first + k < n) x[first + k] = b[k];
  }
}

template <typename T, ParamStore kStore>
struct ParamAccess {
  T* param;
  float* master;
  uint32_t high;  // random key of the chunk (stochastic rounding)
  int64_t start;  // element index of the chunk's first element

  __device__ __forceinline__ void load(int64_t first, int64_t n, bool whole,
                                       float (&p)[kIlp]) const {
    if (kStore == kFromMaster)
      load_group(master, first, n, whole, p);
    else
      load_group(param, first, n, whole, p);
  }

  __device__ __forceinline__ void store(int64_t first, int64_t n, bool whole,
                                        const float (&p)[kIlp]) const {
    if (kStore == kFromMaster) store_group(master, first, n, whole, p);
    if constexpr (kStore == kStochastic && !std::is_same_v<T, float>) {
      uint16_t b[kIlp];
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const uint32_t r = element_bits(high, static_cast<uint32_t>(start + first + k));
        b[k] = std::is_same_v<T, bf16_t> ? round_bf16_stochastic(p[k], r >> 16)
                                         : round_fp16_stochastic(p[k], r);
      }
      store_bits_group(reinterpret_cast<uint16_t*>(param), first, n, whole, b);
    } else {
      store_group(param, first, n, whole, p);
    }
  }
};

template <bool kL2>
__device__ __forceinline__ void update_group(float (&p)[kIlp], float (&g)[kIlp],
                                             float (&m)[kIlp], float (&v)[kIlp],
                                             const SharedCoefs& s) {
#pragma unroll
  for (int k = 0; k < kIlp; ++k) {
    g[k] = used_grad(g[k], s.gt);
    lean_adam_math<kL2>(p[k], g[k], m[k], v[k], s.c);
  }
}

// fp32 or bf16 moments: groups of 4 consecutive elements per thread.
template <typename T, int kState, bool kL2, ParamStore kStore>
__device__ void dense_chunk(const ParamAccess<T, kStore>& pa, const T* grad, void* m_raw,
                            void* v_raw, int64_t n, const SharedCoefs& s) {
  using M = typename std::conditional<kState == kLeanStateF32, float, uint16_t>::type;
  M* m_ptr = static_cast<M*>(m_raw);
  M* v_ptr = static_cast<M*>(v_raw);
  const bool aligned = group_aligned<T>(pa.param) && group_aligned<T>(grad) &&
                       group_aligned<M>(m_ptr) && group_aligned<M>(v_ptr) &&
                       (kStore != kFromMaster || group_aligned<float>(pa.master));
  for_each_group(n, aligned, [&](int64_t first, bool whole) {
    float p[kIlp], g[kIlp], m[kIlp], v[kIlp];
    pa.load(first, n, whole, p);
    load_group(grad, first, n, whole, g);
    if constexpr (kState == kLeanStateF32) {
      load_group(m_ptr, first, n, whole, m);
      load_group(v_ptr, first, n, whole, v);
    } else {
      load_group(reinterpret_cast<const bf16_t*>(m_ptr), first, n, whole, m);
      load_group(reinterpret_cast<const bf16_t*>(v_ptr), first, n, whole, v);
    }
    update_group<kL2>(p, g, m, v, s);
    if constexpr (kState == kLeanStateF32) {
      store_group(m_ptr, first, n, whole, m);
      store_group(v_ptr, first, n, whole, v);
    } else {
      uint16_t mb[kIlp], vb[kIlp];
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const uint32_t r = element_bits(s.state_high, static_cast<uint32_t>(pa.start + first + k));
        mb[k] = round_bf16_stochastic(m[k], r & 0xffffu);
        vb[k] = round_bf16_stochastic(v[k], r >> 16);
      }
      store_bits_group(m_ptr, first, n, whole, mb);
      store_bits_group(v_ptr, first, n, whole, vb);
    }
    pa.store(first, n, whole, p);
  });
}

// Maximum of the magnitude bits over the warp (NaN bits exceed inf's).
__device__ __forceinline__ uint32_t warp_max(uint32_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// 8-bit moments: warp w takes the 256-element blocks w, w + 16, ... of the chunk.
template <typename T, bool kL2, ParamStore kStore>
__device__ void quantized_chunk(const ParamAccess<T, kStore>& pa, const T* grad,
                                int8_t* m_codes, uint8_t* v_codes, float* m_absmax,
                                float* v_absmax, int64_t n, const SharedCoefs& s) {
  constexpr int kPerLane = kQuantBlock / 32;  // 8 = two groups
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
  const bool aligned = group_aligned<T>(pa.param) && group_aligned<T>(grad) &&
                       (kStore != kFromMaster || group_aligned<float>(pa.master));
  for (int64_t b = threadIdx.x / 32; b < blocks; b += kBlockThreads / 32) {
    const int64_t base = b * kQuantBlock + lane * kPerLane;
    const float m_scale = m_absmax[b], v_scale = v_absmax[b];
    float m_new[kPerLane], v_new[kPerLane];
    uint32_t m_bits = 0, v_bits = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t first = base + h * kIlp;
      const bool whole = aligned && first + kIlp <= n;
      float p[kIlp], g[kIlp], m[kIlp], v[kIlp];
      pa.load(first, n, whole, p);
      load_group(grad, first, n, whole, g);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const bool valid = first + k < n;
        m[k] = signed_value(valid ? m_codes[first + k] : int8_t(0), m_scale);
        v[k] = unsigned_value(valid ? v_codes[first + k] : uint8_t(0), v_scale);
      }
      update_group<kL2>(p, g, m, v, s);
      pa.store(first, n, whole, p);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const bool valid = first + k < n;
        m_new[h * kIlp + k] = m[k];
        v_new[h * kIlp + k] = v[k];
        m_bits = valid ? max(m_bits, f32_bits(m[k]) & 0x7fffffffu) : m_bits;
        v_bits = valid ? max(v_bits, f32_bits(v[k]) & 0x7fffffffu) : v_bits;
      }
    }
    const float m_max = block_absmax(bits_f32(warp_max(m_bits)));
    const float v_max = block_absmax(bits_f32(warp_max(v_bits)));
    if (lane == 0) {
      m_absmax[b] = m_max;
      v_absmax[b] = v_max;
    }
    const bool m_ok = block_has_codes(m_max), v_ok = block_has_codes(v_max);
    const float ms = m_ok ? code_scale<kSignedLevels>(m_max) : 0.0f;
    const float vs = v_ok ? code_scale<kUnsignedLevels>(v_max) : 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      if (base + k < n) {
        m_codes[base + k] = m_ok ? signed_code(m_new[k], ms) : int8_t(0);
        v_codes[base + k] = v_ok ? unsigned_code(v_new[k], vs) : uint8_t(0);
      }
    }
  }
}

template <typename T, int kState, ParamStore kStore>
struct LeanChunk {
  LeanArgs a;

  __device__ void operator()(const TensorTable<kLeanLists>& tab, int slot, int, int64_t start,
                             int64_t n) const {
    if (a.skip != nullptr && *a.skip > 0.0f) return;
    __shared__ SharedCoefs shared;
    if (threadIdx.x == 0) {
      const float t_new = *static_cast<const float*>(tab.ptr[kStep][slot]) + 1.0f;
      const uint32_t t = static_cast<uint32_t>(t_new);
      const uint32_t stream =
          static_cast<uint32_t>(reinterpret_cast<uintptr_t>(tab.ptr[kStream][slot]));
      shared.c = lean_adam_coefs(read(a.lr), read(a.beta1), read(a.beta2), a.eps,
                                 a.weight_decay, a.decoupled, t);
      shared.gt = GradTransform{scalar_or(a.inv_scale, 1.0f), scalar_or(a.clip_coef, 1.0f),
                                a.sign};
      shared.param_high = high_key(tensor_key(a.seed, stream, t, kParamBits), start);
      shared.state_high = high_key(tensor_key(a.seed, stream, t, kStateBits), start);
    }
    __syncthreads();
    const SharedCoefs s = shared;
    const ParamAccess<T, kStore> pa{
        static_cast<T*>(tab.ptr[kParam][slot]) + start,
        kStore == kFromMaster ? static_cast<float*>(tab.ptr[kMaster][slot]) + start : nullptr,
        s.param_high, start};
    const T* grad = static_cast<const T*>(tab.ptr[kGrad][slot]) + start;
    if constexpr (kState == kLeanStateQ8) {
      int8_t* m = static_cast<int8_t*>(tab.ptr[kExpAvg][slot]) + start;
      uint8_t* v = static_cast<uint8_t*>(tab.ptr[kExpAvgSq][slot]) + start;
      float* ma = static_cast<float*>(tab.ptr[kMAbsmax][slot]) + start / kQuantBlock;
      float* va = static_cast<float*>(tab.ptr[kVAbsmax][slot]) + start / kQuantBlock;
      if (a.l2)
        quantized_chunk<T, true, kStore>(pa, grad, m, v, ma, va, n, s);
      else
        quantized_chunk<T, false, kStore>(pa, grad, m, v, ma, va, n, s);
    } else {
      constexpr int64_t kBytes = kState == kLeanStateF32 ? 4 : 2;
      char* m = static_cast<char*>(tab.ptr[kExpAvg][slot]) + start * kBytes;
      char* v = static_cast<char*>(tab.ptr[kExpAvgSq][slot]) + start * kBytes;
      if (a.l2)
        dense_chunk<T, kState, true, kStore>(pa, grad, m, v, n, s);
      else
        dense_chunk<T, kState, false, kStore>(pa, grad, m, v, n, s);
    }
  }
};

template <typename T, ParamStore kStore>
cudaError_t launch_state(const LeanAdamTensors& t, const MultiTensorPlan& plan,
                         const LeanArgs& a, cudaStream_t stream) {
  const auto fill = [&](TensorTable<kLeanLists>& tab, int slot, int32_t i) {
    const bool q8 = t.state == kLeanStateQ8;
    tab.ptr[kParam][slot] = t.params[i];
    tab.ptr[kGrad][slot] = const_cast<void*>(t.grads[i]);
    tab.ptr[kExpAvg][slot] = t.exp_avg[i];
    tab.ptr[kExpAvgSq][slot] = t.exp_avg_sq[i];
    tab.ptr[kMAbsmax][slot] = q8 ? t.exp_avg_absmax[i] : nullptr;
    tab.ptr[kVAbsmax][slot] = q8 ? t.exp_avg_sq_absmax[i] : nullptr;
    tab.ptr[kMaster][slot] = t.master ? t.master[i] : nullptr;
    tab.ptr[kStep][slot] = t.step[i];
    tab.ptr[kStream][slot] = reinterpret_cast<void*>(static_cast<uintptr_t>(t.stream[i]));
  };
  switch (t.state) {
    case kLeanStateBF16:
      return launch_multi_tensor<kLeanLists>(plan, t.numel, fill,
                                             LeanChunk<T, kLeanStateBF16, kStore>{a}, stream);
    case kLeanStateQ8:
      return launch_multi_tensor<kLeanLists>(plan, t.numel, fill,
                                             LeanChunk<T, kLeanStateQ8, kStore>{a}, stream);
    default:
      return launch_multi_tensor<kLeanLists>(plan, t.numel, fill,
                                             LeanChunk<T, kLeanStateF32, kStore>{a}, stream);
  }
}

}  // namespace

cudaError_t lean_adam_step(const LeanAdamTensors& t, const LeanAdamParams& p,
                           const MultiTensorPlan& plan, cudaStream_t stream) {
  if (t.dtype < 0 || t.dtype > 2 || t.num_tensors < 0) return cudaErrorInvalidValue;
  if (t.state < kLeanStateF32 || t.state > kLeanStateQ8) return cudaErrorInvalidValue;
  if (t.num_tensors == 0) return cudaSuccess;
  if (t.state == kLeanStateQ8 && (t.exp_avg_absmax == nullptr || t.exp_avg_sq_absmax == nullptr ||
                                  plan.chunk_size % kQuantBlock != 0))
    return cudaErrorInvalidValue;
  if (!plan_fits(plan)) return cudaErrorInvalidValue;
  const LeanArgs a{p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, p.decoupled,
                   !p.decoupled && p.weight_decay != 0.0, p.maximize ? -1.0f : 1.0f, p.seed,
                   p.inv_scale, p.clip_coef, p.skip};
  const cudaError_t err = FO_DTYPE_SWITCH(t.dtype, T, [&] {
    if constexpr (std::is_same_v<T, float>) {
      return launch_state<T, kNearest>(t, plan, a, stream);
    } else {
      if (t.master != nullptr) return launch_state<T, kFromMaster>(t, plan, a, stream);
      if (p.stochastic_params) return launch_state<T, kStochastic>(t, plan, a, stream);
      return launch_state<T, kNearest>(t, plan, a, stream);
    }
  });
  if (err != cudaSuccess) return err;
  return update_counters(t.step, t.num_tensors, /*set_one=*/false, p.skip, stream);
}

}  // namespace fusedopt::cuda
