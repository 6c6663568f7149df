// Device helpers of the CUDA kernels: dtype conversion, 16-byte packs, and warp and block
// reductions (cub's WarpReduce, BlockReduce for sums) of the (m, s') state by the merge rule of
// stablekernels/online_softmax.h, and of sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stablekernels/layout.h>
#include <stablekernels/online_softmax.h>

#include <cassert>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/util_ptx.cuh>
#include <cub/warp/warp_reduce.cuh>
#include <cuda/cmath>
#include <cuda/std/bit>
#include <cuda/std/functional>
#include <type_traits>

#include "kernels.h"

// A device-side assert kept in release builds (as torch's CUDA_KERNEL_ASSERT; NDEBUG would
// remove assert()): the kernel traps and the stream reports cudaErrorAssert at the next
// synchronisation, without the host waiting for it.
#define SK_DEVICE_ASSERT(cond)                                                              \
  do {                                                                                      \
    if (!(cond)) __assert_fail(#cond, __FILE__, static_cast<unsigned>(__LINE__), __func__); \
  } while (0)

namespace stablekernels::cuda::detail {

using ::cuda::ceil_div;

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

// -inf in T (a half type too): the padding of a forward row.
template <typename T>
__device__ __forceinline__ T minus_infinity() {
  return from_acc<T>(-infinity<float>());
}

// VEC elements loaded or stored with one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The number of elements of T in 16 bytes.
template <typename T>
constexpr int kPack = 16 / sizeof(T);

// ---------------------------------------------------------------------------------------
// Reductions over a warp or a 1-D block of THREADS (a multiple of 32, at most 1024), by cub,
// with `op` one of the operators below. The result is in lane (thread) 0; the *_all forms
// hand it to every thread.
//
// Across a block, states (RowState, CeState: a merge is a compare, a branch and an exp) reduce
// in two levels of cub::WarpReduce, each a shuffle tree of log2 depth: each warp merges its
// lanes, lane 0 of each warp stores the warp's state, and after one barrier warp 0 merges the
// kWarps states (5 levels for 32 warps). cub::BlockReduce would instead merge the kWarps
// states one after the other in thread 0: up to 31 dependent merges, each with an exp.
// Plain numbers (the backward sums) stay on cub::BlockReduce: there the serial part is a chain
// of at most 31 adds with their loads all issued up front, about the latency of the 5
// shuffle-and-add levels of a second warp reduction.

// The merge rule of the (m, s') state (stablekernels/online_softmax.h) as an operator: equal
// maxima (-inf and +inf included) merge exactly, and a NaN s' stays NaN.
struct Merge {
  template <typename A>
  __device__ __forceinline__ RowState<A> operator()(const RowState<A>& a,
                                                    const RowState<A>& b) const {
    return merge(a, b);
  }
};

using Sum = ::cuda::std::plus<>;  // cub's shuffles have a fast path for float and double sums

template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
  using Reduce = cub::WarpReduce<V>;
  // One (empty: whole warps reduce by shuffles) storage per warp of the block.
  __shared__ typename Reduce::TempStorage temp[32];
  const unsigned warp = (threadIdx.x + threadIdx.y * blockDim.x) / 32;
  return Reduce(temp[warp]).Reduce(v, op);
}

template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce_all(V v, Op op) {
  return cub::ShuffleIndex<32>(warp_reduce(v, op), 0, 0xffffffffu);
}

// The second level of a block's merge: the first kLanes threads (warp 0, or its first half
// and so on) merge the WARPS states in `partial`, padded with the empty state V::empty() up
// to a power of two of lanes. The result in thread 0 (other threads get `v` back). Called by
// every thread once `partial` is written and the block synced.
template <int WARPS, typename V, typename Op>
__device__ __forceinline__ V merge_warps(const V* partial, V v, Op op) {
  constexpr int kLanes = static_cast<int>(::cuda::std::bit_ceil(static_cast<unsigned>(WARPS)));
  static_assert(kLanes <= 32, "at most 32 warps");
  const int lane = static_cast<int>(threadIdx.x);
  if (lane < kLanes) {
    v = kLanes == WARPS || lane < WARPS ? partial[lane] : V::empty();
    using Reduce = cub::WarpReduce<V, kLanes>;
    __shared__ typename Reduce::TempStorage temp;  // empty: a power of two reduces by shuffles
    v = Reduce(temp).Reduce(v, op);
  }
  return v;
}

// The result in thread 0. Back to back calls are safe: the barrier before the warps store
// their states comes after warp 0 has read the previous call's, so no barrier is needed at the
// end (the other warps go on to their next row while warp 0 merges).
template <int THREADS, typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps, at most 1024 threads");
  constexpr int kWarps = THREADS / 32;
  if constexpr (kWarps == 1) {
    return warp_reduce(v, op);
  } else if constexpr (std::is_arithmetic_v<V>) {
    using Reduce = cub::BlockReduce<V, THREADS>;
    __shared__ typename Reduce::TempStorage temp;
    v = Reduce(temp).Reduce(v, op);
    __syncthreads();  // temp is free again for the next call
    return v;
  } else {
    __shared__ V partial[kWarps];
    v = warp_reduce(v, op);
    __syncthreads();  // warp 0 is done with the previous call's partial
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    return merge_warps<kWarps>(partial, v, op);
  }
}

// The result in every thread, broadcast through shared memory. Two barriers: the first
// publishes the warps' states to warp 0; the second publishes `total` and also orders warp 0's
// reads of `partial` before the next call's stores to it. Thread 0 writes `total` again only
// after the next call's first barrier, which every thread reaches after reading this one.
template <int THREADS, typename V, typename Op>
__device__ __forceinline__ V block_reduce_all(V v, Op op) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps, at most 1024 threads");
  constexpr int kWarps = THREADS / 32;
  if constexpr (kWarps == 1) {
    return warp_reduce_all(v, op);
  } else {
    __shared__ V total;
    if constexpr (std::is_arithmetic_v<V>) {
      using Reduce = cub::BlockReduce<V, THREADS>;
      __shared__ typename Reduce::TempStorage temp;
      v = Reduce(temp).Reduce(v, op);  // its barrier comes before thread 0 writes total again
    } else {
      __shared__ V partial[kWarps];
      v = warp_reduce(v, op);
      if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
      __syncthreads();
      v = merge_warps<kWarps>(partial, v, op);
    }
    if (threadIdx.x == 0) total = v;
    __syncthreads();
    return total;
  }
}

// The programs (q, r) = (p / d, p % d) of a grid-stride loop p = blockIdx.x, + gridDim.x, ...
// without a 64-bit division (a call whose spills would cost every kernel using it): 32-bit
// divisions once, then additions.
struct GridWalk {
  int64_t q, r, dq, dr, d;

  __device__ __forceinline__ explicit GridWalk(int64_t divisor) : d(divisor) {
    const uint32_t b = blockIdx.x, g = gridDim.x;
    if (divisor > 0xffffffffLL) {
      q = 0, r = b, dq = 0, dr = g;
    } else {
      const uint32_t dd = static_cast<uint32_t>(divisor);
      q = b / dd, r = b % dd, dq = g / dd, dr = g % dd;
    }
  }

  __device__ __forceinline__ void next() {
    q += dq;
    r += dr;
    if (r >= d) r -= d, ++q;
  }
};

// ---------------------------------------------------------------------------------------
// Groups of R threads sharing a row (R a power of two): R <= 32 lanes of a warp (several rows
// per warp), or a whole block of R threads. The result in every thread of the group.

struct Max {  // NaN is ignored, as fmax does; a NaN element reaches the result through s'
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return fmax(a, b);
  }
};

template <int R, typename V, typename Op>
__device__ __forceinline__ V group_reduce_all(V v, Op op) {
  static_assert((R & (R - 1)) == 0 && R >= 2 && R <= 1024, "a power of two of threads");
  if constexpr (R <= 32) {
    using Reduce = cub::WarpReduce<V, R>;
    __shared__ typename Reduce::TempStorage temp[32];  // empty: shuffles only
    const unsigned group = threadIdx.x / R;
    v = Reduce(temp[group % 32]).Reduce(v, op);
    return cub::ShuffleIndex<R>(v, 0, cub::WarpMask<R>(group % (32 / R)));
  } else {
    return block_reduce_all<R>(v, op);
  }
}

// Host side: calls f(std::integral_constant<int, R>) for a group size R in 4, 8, ... 512
// (kMaxRowThreads, the largest group of softmax.cu and masked_softmax.cu), so that a launcher
// instantiates its kernel for the R its launch plan picked; cudaErrorInvalidValue for any
// other r.
template <typename F>
cudaError_t with_row_threads(int r, F f) {
  switch (r) {
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 256:
      return f(std::integral_constant<int, 256>{});
    case 512:
      return f(std::integral_constant<int, 512>{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------
// Rows read and written in 16-byte packs. A row at p is read in the frame of its packs: frame
// position 0 is the 16-byte boundary at or before p, so element j of the row sits at frame
// position j + pack_shift(p) and every full pack is one aligned 16-byte access. Packs that
// cross the row's ends are read element by element (padded), so any length and any
// element-aligned start takes the vector path for its body.

template <typename T>
__device__ __forceinline__ int pack_shift(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % kPack<T>);
}

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// row[j, j + kPack<T>): one 16-byte load when the pack lies inside [0, n) and is aligned
// (always, for the row the frame is taken from); else element by element, `pad` outside.
template <typename T>
__device__ __forceinline__ Pack<T, kPack<T>> load_pack(const T* __restrict__ row, int64_t j,
                                                       int64_t n, T pad) {
  constexpr int kVec = kPack<T>;
  Pack<T, kVec> p;
  if (j >= 0 && j + kVec <= n && aligned16(row + j)) {
    p = *reinterpret_cast<const Pack<T, kVec>*>(row + j);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) p.v[e] = j + e >= 0 && j + e < n ? row[j + e] : pad;
  }
  return p;
}

// Writes row[j, j + VEC) (the part inside [0, n)) from values in A, each rounded once: in
// 16-byte stores when the span is whole and aligned, else element by element.
template <typename U, int VEC, typename A>
__device__ __forceinline__ void store_values(U* __restrict__ row, int64_t j, int64_t n,
                                             const A (&v)[VEC]) {
  constexpr int kSub = kPack<U>;
  static_assert(VEC % kSub == 0, "whole 16-byte stores of U");
  if (j >= 0 && j + VEC <= n && aligned16(row + j)) {
#pragma unroll
    for (int c = 0; c < VEC / kSub; ++c) {
      Pack<U, kSub> p;
#pragma unroll
      for (int e = 0; e < kSub; ++e) p.v[e] = from_acc<U>(v[c * kSub + e]);
      *reinterpret_cast<Pack<U, kSub>*>(row + j + c * kSub) = p;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (j + e >= 0 && j + e < n) row[j + e] = from_acc<U>(v[e]);
    }
  }
}

// The number of elements of [j, j + VEC) inside [0, n).
template <int VEC>
__device__ __forceinline__ int64_t inside(int64_t j, int64_t n) {
  const int64_t lo = j > 0 ? j : 0, hi = j + VEC < n ? j + VEC : n;
  return hi > lo ? hi - lo : 0;
}

// ---------------------------------------------------------------------------------------
// The softmax and log_softmax backward over a piece of a row held in registers (softmax.cu's
// backward kernels, and the masked backward of masked_softmax.cu): softmax dx = y * (g -
// sum(g * y)), log_softmax dx = g - exp(y) * sum(g).

// Packs of grad and of y per thread of a backward row kernel.
constexpr int kBackwardItems = 4;

// Thread `lane` of a group of R holds packs k = 0 .. ITEMS - 1 at frame positions
// (k * R + lane) * VEC of its piece; as element indices of the row, from `first` (the frame
// position of the piece's start minus the row's pack shift):
template <int R, int VEC>
__device__ __forceinline__ int64_t slot(int64_t first, int k, int lane) {
  return first + (static_cast<int64_t>(k) * R + lane) * VEC;
}

// The plain backward's epilogue: the value as computed.
struct KeepValue {
  template <typename A>
  __device__ __forceinline__ A operator()(A value, A) const {
    return value;
  }
};

template <typename A>
__device__ __forceinline__ A backward_term(A g, A y, bool log) {
  return log ? g : g * y;
}

template <typename A>
__device__ __forceinline__ A backward_value(A g, A y, A total, bool log) {
  return log ? g - exp(y) * total : y * (g - total);
}

// grad and y of one piece of a row, in registers as read (T), converted where used.
template <typename T, typename A, int R, int ITEMS>
struct BackwardPiece {
  static constexpr int kVec = kPack<T>;
  Pack<T, kVec> g[ITEMS], y[ITEMS];

  // Loads both, then returns this thread's sum of the backward terms.
  __device__ __forceinline__ A load(const T* __restrict__ grad, const T* __restrict__ out,
                                    int64_t first, int64_t n, int lane, bool log) {
    const T zero = from_acc<T>(0.0f);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t j = slot<R, kVec>(first, k, lane);
      if (j < n) {
        g[k] = load_pack(grad, j, n, zero);
        y[k] = load_pack(out, j, n, zero);
      }
    }
    A total = 0;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      if (slot<R, kVec>(first, k, lane) < n) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          total += backward_term(to_acc<A>(g[k].v[e]), to_acc<A>(y[k].v[e]), log);
        }
      }
    }
    return total;
  }

  // dx from the row's total: each value backward_value, passed through `finish(value, y)`
  // (the masked backward's rule; the plain backward keeps the value).
  template <typename U, typename F = KeepValue>
  __device__ __forceinline__ void store(U* __restrict__ dx, int64_t first, int64_t n, int lane,
                                        A total, bool log, F finish = {}) const {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t j = slot<R, kVec>(first, k, lane);
      if (j < n) {
        A d[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const A yv = to_acc<A>(y[k].v[e]);
          d[e] = finish(backward_value(to_acc<A>(g[k].v[e]), yv, total, log), yv);
        }
        store_values(dx, j, n, d);
      }
    }
  }
};

}  // namespace stablekernels::cuda::detail
