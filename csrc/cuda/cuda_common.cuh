// Device helpers shared by the CUDA kernels of the fused cross-entropy: dtype-erased element
// access, vector loads, deterministic warp/block reductions and the per-row arguments both kernel
// families (small C and large C) read.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../margin_math.h"
#include "device_api.cuh"

namespace udat {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The dtype of a tensor whose element type is only known at run time (weight, grad weight,
// grl_lambda): these are read or written a few times per element at most, so a uniform switch
// costs less than instantiating every kernel for every dtype pair.
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

template <typename T>
__device__ __forceinline__ T load_as(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<T>(static_cast<const float*>(p)[i]);
    case DType::F64: return static_cast<T>(static_cast<const double*>(p)[i]);
    case DType::F16: return static_cast<T>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    default: return static_cast<T>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
  }
}

template <typename T>
__device__ __forceinline__ void store_as(void* p, DType t, int64_t i, T v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::F64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    case DType::F16: static_cast<c10::Half*>(p)[i] = c10::Half(static_cast<float>(v)); break;
    default: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(static_cast<float>(v)); break;
  }
}

// Scalar conversions between a storage type and the accumulation type.
template <typename A, typename S>
__device__ __forceinline__ A to_acc(S v) {
  return static_cast<A>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) { return v; }
template <>
__device__ __forceinline__ float to_acc<float, double>(double v) { return static_cast<float>(v); }

template <typename S, typename A>
__device__ __forceinline__ S from_acc(A v) {
  return S(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double, float>(float v) { return v; }

// N elements loaded or stored as one aligned vector (16 bytes for the row loads).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// A vector load or store at p, which must be aligned to the vector's size: the hardware faults
// otherwise, and the emulation checks it (x86 would not mind).
template <typename V, typename T>
__device__ __forceinline__ V load_vec(const T* p) {
  UDAT_CHECK_VECTOR_ACCESS(p, sizeof(V));
  return *reinterpret_cast<const V*>(p);
}
template <typename V, typename T>
__device__ __forceinline__ void store_vec(T* p, const V& v) {
  UDAT_CHECK_VECTOR_ACCESS(p, sizeof(V));
  *reinterpret_cast<V*>(p) = v;
}

// A value another block wrote and published (last-block-done): read past L1, which is not
// coherent across SMs.
template <typename T>
__device__ __forceinline__ T load_cg(const T* p) {
  return UDAT_LOAD_CG(p);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Sum over the block, in a fixed order (so the result is the same from run to run). `scratch`
// holds one value per warp. Every thread gets the total. Ends with the scratch free again.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < nwarps ? scratch[lane] : T(0);
    total = warp_sum(total);
    if (lane == 0) scratch[0] = total;
  }
  __syncthreads();
  total = scratch[0];
  __syncthreads();
  return total;
}

// Online log-sum-exp merged over the block, in a fixed order. Every thread gets (max, sum).
template <typename T>
__device__ void block_lse(T& m, T& s, T* scratch_m, T* scratch_s) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T m2 = __shfl_xor_sync(kFullMask, m, o);
    const T s2 = __shfl_xor_sync(kFullMask, s, o);
    lse_merge(m, s, m2, s2);
  }
  __syncthreads();
  if (lane == 0) {
    scratch_m[warp] = m;
    scratch_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    T mw = lane < nwarps ? scratch_m[lane] : -INFINITY;
    T sw = lane < nwarps ? scratch_s[lane] : T(0);
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const T m2 = __shfl_xor_sync(kFullMask, mw, o);
      const T s2 = __shfl_xor_sync(kFullMask, sw, o);
      lse_merge(mw, sw, m2, s2);
    }
    if (lane == 0) {
      scratch_m[0] = mw;
      scratch_s[0] = sw;
    }
  }
  __syncthreads();
  m = scratch_m[0];
  s = scratch_s[0];
  __syncthreads();
}

// What every row of the loss needs besides the logits: targets, weights and the margin. All
// pointers are device pointers in the accumulation type A; a null pointer means "absent".
template <typename A>
struct RowArgs {
  const int64_t* target;
  const A* class_weight;   // (num_classes,) or null (all ones)
  const A* sample_weight;  // (B,) or null (all ones)
  const A* bias;           // (C,) or null (linear head only)
  const A* wsum;           // () sum of the class weights, or null (then C)
  int64_t B, C, D;         // C: the classes of weight (the shard's in the shard mode)
  // The shard mode (docs/design.md, "Shard mode"): weight holds the classes [offset, offset + C)
  // of num_classes. The ordinary op is the whole problem: offset 0, num_classes = C, shard false.
  int64_t offset;
  int64_t num_classes;     // targets range over it; b = ε / num_classes, W over all of it
  bool shard;              // rows write q_i, not the loss; ignored rows get δ = 0 exactly
  int64_t ignore_index;
  A smoothing;
  MarginParams<A> mp;
  bool normalize;
  int reduction;  // Reduction as int
};

// A row's target: valid (in [0, num_classes)), ignored (== ignore_index) or bad (anything else);
// owned when valid and one of weight's classes, at column col = y - offset (the ordinary op:
// owned = valid, col = y). A bad target is never used as an index; its row's loss and gradient
// are NaN.
struct RowTarget {
  int64_t y;
  int64_t col;
  bool valid;
  bool bad;
  bool owned;
};

template <typename A>
__device__ __forceinline__ RowTarget read_target(const RowArgs<A>& a, int64_t i) {
  RowTarget t;
  t.y = a.target[i];
  const bool ignored = t.y == a.ignore_index;
  t.valid = !ignored && t.y >= 0 && t.y < a.num_classes;
  t.bad = !ignored && !t.valid;
  t.col = t.y - a.offset;
  t.owned = t.valid && t.col >= 0 && t.col < a.C;
  return t;
}

// Whether the row's logit gradient is exactly zero whatever its logits (the shard mode's ignored
// rows, as the reference shard mode gives them, even where the logits are not finite).
template <typename A>
__device__ __forceinline__ bool zero_row(const RowArgs<A>& a, const RowTarget& t) {
  return a.shard && !t.valid && !t.bad;
}

// The weight of class y, a global id (a target).
template <typename A>
__device__ __forceinline__ A class_w(const RowArgs<A>& a, int64_t y) {
  return a.class_weight ? a.class_weight[y] : A(1);
}

// The weight of weight's column j: class offset + j.
template <typename A>
__device__ __forceinline__ A col_w(const RowArgs<A>& a, int64_t j) {
  return a.class_weight ? a.class_weight[a.offset + j] : A(1);
}

template <typename A>
__device__ __forceinline__ A sample_w(const RowArgs<A>& a, int64_t i) {
  return a.sample_weight ? a.sample_weight[i] : A(1);
}

template <typename A>
__device__ __forceinline__ A weight_sum(const RowArgs<A>& a) {
  return a.wsum ? *a.wsum : A(a.num_classes);
}

// The mean's divisor contribution of a row: v_i w_{y_i}, zero for ignored and bad rows.
template <typename A>
__device__ __forceinline__ A row_divisor(const RowArgs<A>& a, int64_t i) {
  const RowTarget t = read_target(a, i);
  return t.valid ? sample_w(a, i) * class_w(a, t.y) : A(0);
}

// How the gradient of a row is scaled: k_i = v_i · upstream_i (÷ the mean's divisor), and the
// fused GRL factor -λ on grad x. λ is read on the device (no host sync) when it lives there.
template <typename A>
struct GradScale {
  const A* upstream;       // null: one; else (B,) when per_row, () otherwise
  bool per_row;
  const A* divisor_parts;  // mean: partial sums of the divisor, summed in order; else null
  int n_divisor_parts;
  const void* lambda;      // 0-dim grl_lambda on the device, or null
  DType lambda_dtype;
  A x_scale_host;          // -λ when λ was given on the host, else 1
};

template <typename A>
__device__ __forceinline__ A grad_x_scale(const GradScale<A>& g) {
  return g.lambda ? -load_as<A>(g.lambda, g.lambda_dtype, 0) : g.x_scale_host;
}

// 1 / divisor for the mean (0 when the divisor is 0: every gradient is then zero), else 1.
template <typename A>
__device__ __forceinline__ A inv_divisor(A divisor) {
  return divisor != A(0) ? A(1) / divisor : A(0);
}

// k_i of a row; NaN for a bad target.
template <typename A>
__device__ __forceinline__ A row_k(const RowArgs<A>& a, const GradScale<A>& g, const RowTarget& t,
                                   int64_t i, A inv_div) {
  if (t.bad) return A(NAN);
  if (!t.valid) return A(0);
  A k = sample_w(a, i) * inv_div;
  if (g.upstream) k *= g.per_row ? g.upstream[i] : g.upstream[0];
  return k;
}

}  // namespace cuda
}  // namespace udat
