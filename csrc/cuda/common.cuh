// Device helpers of the CUDA kernels: dtype conversion, 16-byte packs, and warp and block
// reductions of the (m, s') state (stablekernels/online_softmax.h) and of sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stablekernels/layout.h>
#include <stablekernels/online_softmax.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace stablekernels::cuda::detail {

// The accumulation type of a kernel reading T and writing U: fp64 if either is fp64.
template <typename T, typename U = T>
using acc_of =
    std::conditional_t<std::is_same_v<T, double> || std::is_same_v<U, double>, double, float>;

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<A>(__half2float(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<A>(__bfloat162float(v));
  } else {
    return static_cast<A>(v);
  }
}

// Rounds once, to nearest even.
template <typename U, typename A>
__device__ __forceinline__ U from_acc(A v) {
  if constexpr (std::is_same_v<U, __half>) {
    if constexpr (std::is_same_v<A, double>) {
      return __double2half(v);
    } else {
      return __float2half_rn(v);
    }
  } else if constexpr (std::is_same_v<U, __nv_bfloat16>) {
    if constexpr (std::is_same_v<A, double>) {
      return __double2bfloat16(v);
    } else {
      return __float2bfloat16_rn(v);
    }
  } else {
    return static_cast<U>(v);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks in a 1-D grid (kernels loop grid-stride beyond).
inline unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(blocks < 0x7fffffff ? blocks : 0x7fffffff);
}

// ---------------------------------------------------------------------------------------
// dtype dispatch: the pairs the kernels write directly (see kernels.h).

template <typename F>
cudaError_t with_pair(Dtype in, Dtype out, F f) {
  switch (in) {
    case Dtype::kFloat32:
      if (out == Dtype::kFloat32) return f(float{}, float{});
      if (out == Dtype::kFloat64) return f(float{}, double{});
      break;
    case Dtype::kFloat64:
      if (out == Dtype::kFloat64) return f(double{}, double{});
      break;
    case Dtype::kFloat16:
      if (out == Dtype::kFloat16) return f(__half{}, __half{});
      if (out == Dtype::kFloat32) return f(__half{}, float{});
      if (out == Dtype::kFloat64) return f(__half{}, double{});
      break;
    case Dtype::kBFloat16:
      if (out == Dtype::kBFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{});
      if (out == Dtype::kFloat32) return f(__nv_bfloat16{}, float{});
      if (out == Dtype::kFloat64) return f(__nv_bfloat16{}, double{});
      break;
  }
  return cudaErrorInvalidValue;
}

inline size_t element_size(Dtype t) {
  switch (t) {
    case Dtype::kFloat64:
      return 8;
    case Dtype::kFloat32:
      return 4;
    default:
      return 2;
  }
}

template <typename A>
__device__ __forceinline__ A infinity() {
  return static_cast<A>(INFINITY);
}

template <typename A>
__device__ __forceinline__ A quiet_nan() {
  return static_cast<A>(NAN);
}

// log(1 + s), accurate for tiny s.
template <typename A>
__device__ __forceinline__ A log1p_of(A s) {
  return log1p(s);
}

// VEC elements loaded or stored with one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The number of elements of T in 16 bytes.
template <typename T>
constexpr int kPack = 16 / sizeof(T);

template <typename A>
__device__ __forceinline__ RowState<A> shfl_xor(RowState<A> st, int offset) {
  return {__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset)};
}

// Every lane of the warp ends with the merged state of the warp.
template <typename A>
__device__ __forceinline__ RowState<A> warp_merge(RowState<A> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) st = merge(st, shfl_xor(st, offset));
  return st;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Every thread of the block ends with the merged state of the block (1-D blocks of THREADS,
// a multiple of 32). Uses and re-syncs its own shared memory.
template <int THREADS, typename A>
__device__ __forceinline__ RowState<A> block_merge(RowState<A> st) {
  constexpr int kWarps = THREADS / 32;
  __shared__ A shared_m[kWarps];
  __shared__ A shared_s[kWarps];
  st = warp_merge(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = st.m;
    shared_s[warp] = st.s;
  }
  __syncthreads();
  st = lane < kWarps ? RowState<A>{shared_m[lane], shared_s[lane]} : RowState<A>::empty();
  st = warp_merge(st);  // every warp merges the warps' states: no second barrier needed
  __syncthreads();      // shared memory is free again for the next call
  return st;
}

template <int THREADS, typename A>
__device__ __forceinline__ A block_sum(A v) {
  constexpr int kWarps = THREADS / 32;
  __shared__ A shared[kWarps];
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < kWarps ? shared[lane] : A(0);
  v = warp_sum(v);
  __syncthreads();
  return v;
}

// torch's softmax and log_softmax are NaN on a whole row with a +inf, a NaN or nothing but
// -inf, i.e. wherever the merged max is not finite (or s' is NaN).
template <typename A>
__device__ __forceinline__ bool row_is_nan(const RowState<A>& st) {
  return !isfinite(st.m) || isnan(st.s);
}

template <typename A>
__device__ __forceinline__ A softmax_value(A v, const RowState<A>& st, bool log, A log_sum) {
  if (row_is_nan(st)) return quiet_nan<A>();
  return log ? (v - st.m) - log_sum : exp(v - st.m) / (A(1) + st.s);  // IEEE division
}

}  // namespace stablekernels::cuda::detail
