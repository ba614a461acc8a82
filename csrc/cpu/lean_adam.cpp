// Multi-tensor lean Adam / AdamW step on CPU tensors: bf16 or 8-bit moments, stochastic
// rounding of bf16/fp16 params (OpenMP over chunks + SIMD inner loops).
//
// Math (fusedopt/math_lean.h, every operation a separately rounded fp32 operation):
//   g' = ((g * inv_scale) * clip_coef) * (maximize ? -1 : 1)
//   AdamW: p = p * (1 - lr*wd)      Adam: g' = g' + wd*p
//   m = b1*m + (1-b1)*g'            v = b2*v + (1-b2)*(g'*g')
//   p = p + (-lr/(1-b1^t) * m) / (sqrt(v) * (1/sqrt(1-b2^t)) + eps),   t = step + 1
// Moments: fp32; bf16 stored with stochastic rounding (random bits of element k: m the low
// 16, v the high 16 of the "state" bits); 8-bit: each block of 256 elements of a tensor
// decoded from its codes and absmax, updated, its new absmax taken and re-encoded (dynamic
// maps). Params: fp32, or bf16/fp16 rounded to nearest, stochastically (the "param" bits),
// or from an fp32 master. skip > 0: nothing is written (params, states, masters, steps).
//
// Memory traffic per element (B = bytes of the param dtype): reads g, p (2B) and the
// moments, writes p (B) and the moments: fp32 moments 8 + 8, bf16 4 + 4, 8-bit 2 + 2
// (+ 8 bytes of absmax per 256 elements each way). fp32 params: 28 / 20 / ~16 bytes.
// A master adds 4 + 4 bytes and replaces the param read.
#include <cmath>
#include <type_traits>
#include <vector>

#include "fusedopt/cpu_lean.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math_lean.h"
#include "lean_blocks.h"
#include "lean_dense.h"
#include "multi_tensor_loop.h"

namespace fusedopt::cpu {
namespace {

using namespace fusedopt::lean;

#define FO_LEAN_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;  // partial maxima of a block (one zmm register)

enum ParamStore { kNearest, kStochastic, kFromMaster };

// Per-tensor constants of a step: coefficients and the random keys.
struct TensorArgs {
  LeanAdamCoefs c;
  uint32_t param_key, state_key;
};

// Per-chunk constants: coefficients, gradient transform, the random keys of the chunk.
struct ChunkArgs {
  LeanAdamCoefs c;
  GradTransform gt;
  uint32_t param_high, state_high;  // high_key() of the chunk's elements
  uint32_t start;                   // lo32 of the element index of the chunk's first element
};

// The used gradient; kTransform = false when there is no inv_scale, clip_coef or maximize
// (the three products by 1 are skipped: they are exact).
template <bool kTransform>
FO_LEAN_INLINE float grad_of(float g, const GradTransform& gt) {
  return kTransform ? used_grad(g, gt) : g;
}

template <typename T, ParamStore kStore>
FO_LEAN_INLINE float load_param(const T* param, const float* master, int64_t i) {
  return kStore == kFromMaster ? master[i] : to_float(param[i]);
}

template <typename T, ParamStore kStore>
FO_LEAN_INLINE void store_param(T* param, float* master, int64_t i, float p,
                                 const ChunkArgs& a) {
  if (kStore == kFromMaster) master[i] = p;
  if constexpr (kStore == kStochastic && !std::is_same_v<T, float>) {
    const uint32_t r = element_bits(a.param_high, a.start + static_cast<uint32_t>(i));
    if constexpr (std::is_same_v<T, bf16_t>)
      param[i] = T{round_bf16_stochastic(p, r >> 16)};
    else
      param[i] = T{round_fp16_stochastic(p, r)};
  } else {
    param[i] = from_float<T>(p);
  }
}

// fp32 or bf16 moments over one chunk.
template <typename T, int kState, bool kL2, ParamStore kStore, bool kTransform>
FO_LEAN_INLINE void dense_loop(T* __restrict param, const T* __restrict grad,
                               void* __restrict exp_avg, void* __restrict exp_avg_sq,
                               float* __restrict master, int64_t n, const ChunkArgs& a) {
  float* __restrict m32 = static_cast<float*>(exp_avg);
  float* __restrict v32 = static_cast<float*>(exp_avg_sq);
  uint16_t* __restrict m16 = static_cast<uint16_t*>(exp_avg);
  uint16_t* __restrict v16 = static_cast<uint16_t*>(exp_avg_sq);
  for (int64_t i = 0; i < n; ++i) {
    float p = load_param<T, kStore>(param, master, i);
    const float g = grad_of<kTransform>(to_float(grad[i]), a.gt);
    float m = kState == kLeanStateF32 ? m32[i] : bits_f32(uint32_t(m16[i]) << 16);
    float v = kState == kLeanStateF32 ? v32[i] : bits_f32(uint32_t(v16[i]) << 16);
    lean_adam_math<kL2>(p, g, m, v, a.c);
    if (kState == kLeanStateF32) {
      m32[i] = m;
      v32[i] = v;
    } else {
      const uint32_t r = element_bits(a.state_high, a.start + static_cast<uint32_t>(i));
      m16[i] = round_bf16_stochastic(m, r & 0xffffu);
      v16[i] = round_bf16_stochastic(v, r >> 16);
    }
    store_param<T, kStore>(param, master, i, p, a);
  }
}

template <typename T, int kState, bool kL2, ParamStore kStore>
FO_CPU_CLONES void dense_chunk(T* __restrict param, const T* __restrict grad,
                               void* __restrict exp_avg, void* __restrict exp_avg_sq,
                               float* __restrict master, int64_t n, const ChunkArgs a,
                               bool transform) {
  if (transform)
    dense_loop<T, kState, kL2, kStore, true>(param, grad, exp_avg, exp_avg_sq, master, n, a);
  else
    dense_loop<T, kState, kL2, kStore, false>(param, grad, exp_avg, exp_avg_sq, master, n, a);
}

// Largest |x| of a block (NaN if any element is NaN): the maximum of the magnitude bits
// (for non-negative floats the bit order is the value order, and NaN bits exceed inf's).
FO_LEAN_INLINE float block_max(const float* __restrict x) {
  uint32_t lane[kLanes] = {};
  for (int i = 0; i < kQuantBlock; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const uint32_t a = f32_bits(x[i + l]) & 0x7fffffffu;
      lane[l] = a > lane[l] ? a : lane[l];
    }
  uint32_t amax = 0;
  for (int l = 0; l < kLanes; ++l) amax = lane[l] > amax ? lane[l] : amax;
  return bits_f32(amax);
}

// The fp32 update of one decoded 8-bit block (m, v in place).
template <typename T, bool kL2, ParamStore kStore, bool kTransform>
FO_LEAN_INLINE void block_update(T* __restrict param, const T* __restrict grad,
                                 float* __restrict master, float* __restrict m,
                                 float* __restrict v, int64_t b0, int nb, const ChunkArgs& a) {
  for (int j = 0; j < nb; ++j) {
    const int64_t i = b0 + j;
    float p = load_param<T, kStore>(param, master, i);
    const float g = grad_of<kTransform>(to_float(grad[i]), a.gt);
    lean_adam_math<kL2>(p, g, m[j], v[j], a.c);
    store_param<T, kStore>(param, master, i, p, a);
  }
}

// 8-bit moments over one chunk (which starts on a block boundary), block by block:
// decode (lean_blocks.h), update in fp32 lanes, new absmax, encode.
template <typename T, bool kL2, ParamStore kStore>
FO_CPU_CLONES void quantized_chunk(T* __restrict param, const T* __restrict grad,
                                   int8_t* __restrict m_codes, uint8_t* __restrict v_codes,
                                   float* __restrict m_absmax, float* __restrict v_absmax,
                                   float* __restrict master, int64_t n, const ChunkArgs a,
                                   bool transform) {
  alignas(64) float m[kQuantBlock];
  alignas(64) float v[kQuantBlock];
  for (int64_t b0 = 0; b0 < n; b0 += kQuantBlock) {
    const int nb = static_cast<int>(n - b0 < kQuantBlock ? n - b0 : kQuantBlock);
    const int64_t block = b0 / kQuantBlock;
    if constexpr (std::is_same_v<T, float>) {
      if (lean_blocks::update_block_fp32(param + b0, grad + b0, m_codes + b0, v_codes + b0,
                                         m_absmax + block, v_absmax + block, nb, a.c, a.gt, kL2,
                                         transform))
        continue;
    }
    lean_blocks::decode_block(m_codes + b0, v_codes + b0, m_absmax[block], v_absmax[block], m,
                              v, nb);
    if (transform)
      block_update<T, kL2, kStore, true>(param, grad, master, m, v, b0, nb, a);
    else
      block_update<T, kL2, kStore, false>(param, grad, master, m, v, b0, nb, a);
    for (int j = nb; j < kQuantBlock; ++j) m[j] = v[j] = 0.0f;
    const float m_max = block_absmax(block_max(m));
    const float v_max = block_absmax(block_max(v));
    m_absmax[block] = m_max;
    v_absmax[block] = v_max;
    lean_blocks::encode_block(m, v, m_max, v_max, m_codes + b0, v_codes + b0, nb);
  }
}

template <typename T, int kState, bool kL2, ParamStore kStore>
void run_lean(const LeanAdamTensors& t, const MultiTensorPlan& plan,
              const std::vector<TensorArgs>& per_tensor, const GradTransform gt) {
  for_each_chunk(plan, t.numel, [&](int32_t i, int64_t, int64_t start, int64_t len) {
    const TensorArgs& ta = per_tensor[i];
    const ChunkArgs a{ta.c, gt, high_key(ta.param_key, start), high_key(ta.state_key, start),
                      static_cast<uint32_t>(start)};
    const bool transform = gt.inv_scale != 1.0f || gt.clip_coef != 1.0f || gt.sign != 1.0f;
    T* param = static_cast<T*>(t.params[i]) + start;
    const T* grad = static_cast<const T*>(t.grads[i]) + start;
    float* master = kStore == kFromMaster ? t.master[i] + start : nullptr;
    if constexpr (kState == kLeanStateQ8) {
      quantized_chunk<T, kL2, kStore>(
          param, grad, static_cast<int8_t*>(t.exp_avg[i]) + start,
          static_cast<uint8_t*>(t.exp_avg_sq[i]) + start,
          t.exp_avg_absmax[i] + start / kQuantBlock, t.exp_avg_sq_absmax[i] + start / kQuantBlock,
          master, len, a, transform);
    } else {
      if constexpr (kState == kLeanStateBF16 && std::is_same_v<T, float>) {
        if (lean_dense::bf16_moments_fp32_params(
                param, grad, static_cast<uint16_t*>(t.exp_avg[i]) + start,
                static_cast<uint16_t*>(t.exp_avg_sq[i]) + start, len, a.c, a.gt, kL2, transform,
                a.state_high, a.start))
          return;
      }
      const int64_t bytes = kState == kLeanStateF32 ? 4 : 2;
      dense_chunk<T, kState, kL2, kStore>(
          param, grad, static_cast<char*>(t.exp_avg[i]) + start * bytes,
          static_cast<char*>(t.exp_avg_sq[i]) + start * bytes, master, len, a, transform);
    }
  });
}

double read_scalar(const ScalarArg& s) { return s.ptr ? static_cast<double>(*s.ptr) : s.value; }

template <typename T, bool kL2>
void dispatch_store(const LeanAdamTensors& t, const LeanAdamParams& p,
                    const MultiTensorPlan& plan, const std::vector<TensorArgs>& args,
                    const GradTransform gt) {
  const auto by_state = [&](auto store) {
    constexpr ParamStore kStore = decltype(store)::value;
    switch (t.state) {
      case kLeanStateBF16: return run_lean<T, kLeanStateBF16, kL2, kStore>(t, plan, args, gt);
      case kLeanStateQ8: return run_lean<T, kLeanStateQ8, kL2, kStore>(t, plan, args, gt);
      default: return run_lean<T, kLeanStateF32, kL2, kStore>(t, plan, args, gt);
    }
  };
  if constexpr (std::is_same_v<T, float>) {
    by_state(std::integral_constant<ParamStore, kNearest>{});
  } else {
    if (t.master != nullptr)
      by_state(std::integral_constant<ParamStore, kFromMaster>{});
    else if (p.stochastic_params)
      by_state(std::integral_constant<ParamStore, kStochastic>{});
    else
      by_state(std::integral_constant<ParamStore, kNearest>{});
  }
}

}  // namespace

int lean_adam_step(const LeanAdamTensors& t, const LeanAdamParams& p,
                   const MultiTensorPlan& plan) {
  if (t.dtype < 0 || t.dtype > 2) return kOptimBadDType;
  if (t.state < kLeanStateF32 || t.state > kLeanStateQ8) return kOptimBadDType;
  if (t.state == kLeanStateQ8 && (t.exp_avg_absmax == nullptr || t.exp_avg_sq_absmax == nullptr ||
                                  plan.chunk_size % kQuantBlock != 0))
    return kOptimBadArgument;
  if (p.skip != nullptr && *p.skip > 0.0f) return kOptimOk;

  // 1. per tensor: the incremented step, its coefficients and random keys
  const double lr = read_scalar(p.lr), beta1 = read_scalar(p.beta1), beta2 = read_scalar(p.beta2);
  const GradTransform gt{scalar_or(p.inv_scale, 1.0f), scalar_or(p.clip_coef, 1.0f),
                         p.maximize ? -1.0f : 1.0f};
  std::vector<TensorArgs> args(static_cast<size_t>(t.num_tensors));
  std::vector<float> new_step(static_cast<size_t>(t.num_tensors));
  for (int64_t i = 0; i < t.num_tensors; ++i) {
    new_step[i] = *t.step[i] + 1.0f;
    const uint32_t step = static_cast<uint32_t>(new_step[i]);
    args[i].c = lean_adam_coefs(lr, beta1, beta2, p.eps, p.weight_decay, p.decoupled, step);
    args[i].param_key = tensor_key(p.seed, t.stream[i], step, kParamBits);
    args[i].state_key = tensor_key(p.seed, t.stream[i], step, kStateBits);
  }

  // 2. the element loops over every chunk
  const bool l2 = !p.decoupled && p.weight_decay != 0.0;
  FO_DTYPE_SWITCH(t.dtype, T, [&] {
    FO_BOOL_SWITCH(l2, kL2, [&] { dispatch_store<T, kL2>(t, p, plan, args, gt); });
  });

  // 3. the step counters, once every chunk that read them is done
  for (int64_t i = 0; i < t.num_tensors; ++i) *t.step[i] = new_step[i];
  return kOptimOk;
}

}  // namespace fusedopt::cpu
