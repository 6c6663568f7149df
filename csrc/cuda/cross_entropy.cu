// CUDA cross-entropy statistics from logits with class targets (docs/design.md;
// stablekernels/_numerics.py combines them into the loss and its gradient). No torch header.
// The bandwidth model: docs/cuda_model.md.
//
// Forward: a block per row walks it in tiles of kTileItems 16-byte packs per thread, every
// load of a tile issued before its first exp. Each thread keeps the two-pass sums of its
// elements against its running max (SumsAtMax, online_softmax.h): a tile whose max is higher
// moves them with one exp, then each element costs one exp. With label smoothing it also keeps
// sum_c w_c (m - x_c) (moved to a new max as a + (m_new - m) W: every term >= 0). The block
// reduces the threads' states (two levels of cub's WarpReduce, common.cuh) and thread 0
// writes the row's nll, smooth and lse, from the target logit it read first. Backward: a block
// per row, the same tiles, one exp per element from the per-row terms the router computes.
#include "common.cuh"

namespace stablekernels::cuda {
namespace detail {
namespace {

constexpr int kTileItems = 4;  // 16-byte packs per thread per tile
constexpr int kBackwardThreads = 256;

template <typename A>
struct CeState {
  RowState<A> st;
  A gaps;     // sum of w_c (st.m - x_c)
  A weights;  // sum of w_c

  // Nothing seen: MergeCe's identity (its weights 0 leave the other side's gaps alone).
  static __device__ __forceinline__ CeState empty() { return {RowState<A>::empty(), A(0), A(0)}; }
};

// The merge of two CeStates: the states' rule, each side's gaps moved to the merged max.
struct MergeCe {
  template <typename A>
  __device__ __forceinline__ CeState<A> operator()(const CeState<A>& a, const CeState<A>& b) const {
    const RowState<A> st = merge(a.st, b.st);
    A gaps = a.gaps + b.gaps;
    // Each side's gaps move to the merged max; a side already at it moves by nothing (also
    // when both maxima are -inf, where st.m - a.st.m would be NaN).
    if (a.weights > 0 && st.m != a.st.m) gaps += (st.m - a.st.m) * a.weights;
    if (b.weights > 0 && st.m != b.st.m) gaps += (st.m - b.st.m) * b.weights;
    return {st, gaps, a.weights + b.weights};
  }
};

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
    cross_entropy_forward_kernel(const T* __restrict__ x, int64_t x_stride,
                                 const int64_t* __restrict__ target,
                                 const acc_of<T>* __restrict__ weight, int64_t rows,
                                 int64_t classes, bool smoothing, double* __restrict__ nll,
                                 double* __restrict__ smooth, double* __restrict__ lse) {
  using A = acc_of<T>;
  constexpr int kVec = kPack<T>;
  constexpr int64_t kTile = int64_t(THREADS) * kTileItems * kVec;
  const int lane = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    A x_target = 0;
    if (lane == 0) {
      const int64_t t = target[row];
      SK_DEVICE_ASSERT(t >= 0 && t < classes);  // as torch's nll_loss: no read outside the row
      x_target = to_acc<A>(xr[t]);
    }
    A m = -infinity<A>(), gaps = 0, weights = 0;
    SumsAtMax<A> sums = SumsAtMax<A>::empty();
    int64_t count = 0;
#pragma unroll 1
    for (int64_t first = -pack_shift(xr); first < classes; first += kTile) {
      Pack<T, kVec> p[kTileItems];
      A w[kTileItems][kVec];
#pragma unroll
      for (int k = 0; k < kTileItems; ++k) {
        const int64_t j = first + (int64_t(k) * THREADS + lane) * kVec;
        p[k] = load_pack(xr, j, classes, minus_infinity<T>());
        if (smoothing) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const bool in_row = j + e >= 0 && j + e < classes;
            w[k][e] = !in_row ? A(0) : weight == nullptr ? A(1) : weight[j + e];
          }
        }
        count += inside<kVec>(j, classes);
      }
      A tile_max = -infinity<A>();
#pragma unroll
      for (int k = 0; k < kTileItems; ++k) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) tile_max = fmax(tile_max, to_acc<A>(p[k].v[e]));
      }
      if (tile_max > m) {  // everything so far moves below the new max: one exp per thread
        const A factor = exp(m - tile_max);
        sums = {(sums.below + sums.at_max) * factor, A(0)};
        if (weights > 0) gaps += (tile_max - m) * weights;
        m = tile_max;
      }
#pragma unroll
      for (int k = 0; k < kTileItems; ++k) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const A v = to_acc<A>(p[k].v[e]);
          sums.add(v, m);
          if (smoothing && w[k][e] != A(0)) {
            gaps += w[k][e] * (isinf(v) && v < 0 ? infinity<A>() : m - v);
            weights += w[k][e];
          }
        }
      }
    }
    CeState<A> c{state_at_max(m, sums, static_cast<A>(count)), gaps, weights};
    c = block_reduce<THREADS>(c, MergeCe{});
    if (lane != 0) continue;
    const double row_m = static_cast<double>(c.st.m);
    const double log_rest = static_cast<double>(log1p(c.st.s));
    lse[row] = finish_lse<double>(c.st);
    nll[row] = (row_m - static_cast<double>(x_target)) + log_rest;
    smooth[row] =
        smoothing ? static_cast<double>(c.gaps) + static_cast<double>(c.weights) * log_rest : 0.0;
  }
}

// dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c - [c == t] * one_hot, terms (hi, lo,
// coef, smooth, one_hot) per row.
template <typename T>
__global__ void __launch_bounds__(kBackwardThreads)
    cross_entropy_backward_kernel(const T* __restrict__ x, int64_t x_stride,
                                  const int64_t* __restrict__ target,
                                  const acc_of<T>* __restrict__ weight,
                                  const acc_of<T>* __restrict__ terms, int64_t rows,
                                  int64_t classes, T* __restrict__ dx) {
  using A = acc_of<T>;
  constexpr int kVec = kPack<T>;
  constexpr int64_t kTile = int64_t(kBackwardThreads) * kTileItems * kVec;
  const int lane = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    T* dr = dx + row * classes;
    const A* k5 = terms + row * 5;
    const A hi = k5[0], lo = k5[1], coef = k5[2], smooth = k5[3], one_hot = k5[4];
    const int64_t t = target[row];
#pragma unroll 1
    for (int64_t first = -pack_shift(xr); first < classes; first += kTile) {
      Pack<T, kVec> p[kTileItems];
#pragma unroll
      for (int k = 0; k < kTileItems; ++k) {
        const int64_t j = first + (int64_t(k) * kBackwardThreads + lane) * kVec;
        if (j < classes) p[k] = load_pack(xr, j, classes, from_acc<T>(0.0f));
      }
#pragma unroll
      for (int k = 0; k < kTileItems; ++k) {
        const int64_t j = first + (int64_t(k) * kBackwardThreads + lane) * kVec;
        if (j >= classes) continue;
        A d[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const int64_t c = j + e;
          const bool in_row = c >= 0 && c < classes;
          const A w = weight == nullptr || !in_row ? A(1) : weight[c];
          d[e] = exp((to_acc<A>(p[k].v[e]) - hi) - lo) * coef - smooth * w;
          if (c == t) d[e] -= one_hot;
        }
        store_values(dr, j, classes, d);
      }
    }
  }
}

}  // namespace
}  // namespace detail

cudaError_t cross_entropy_forward(const void* x, Dtype x_type, int64_t x_stride,
                                  const int64_t* target, const void* weight, int64_t rows,
                                  int64_t classes, bool smoothing, double* nll, double* smooth,
                                  double* lse, cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) -> cudaError_t {
    using T = decltype(xt);
    const auto* w = static_cast<const acc_of<T>*>(weight);
    // Rows of up to one tile of 128 threads take 128 threads, longer ones 512.
    if (classes <= int64_t(128) * detail::kTileItems * detail::kPack<T>) {
      detail::cross_entropy_forward_kernel<T, 128><<<detail::grid_size(rows), 128, 0, stream>>>(
          static_cast<const T*>(x), x_stride, target, w, rows, classes, smoothing, nll, smooth,
          lse);
    } else {
      detail::cross_entropy_forward_kernel<T, 512><<<detail::grid_size(rows), 512, 0, stream>>>(
          static_cast<const T*>(x), x_stride, target, w, rows, classes, smoothing, nll, smooth,
          lse);
    }
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_backward(const void* x, Dtype x_type, int64_t x_stride,
                                   const int64_t* target, const void* weight, const void* terms,
                                   int64_t rows, int64_t classes, void* dx, cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) -> cudaError_t {
    using T = decltype(xt);
    using A = acc_of<T>;
    detail::cross_entropy_backward_kernel<T>
        <<<detail::grid_size(rows), detail::kBackwardThreads, 0, stream>>>(
            static_cast<const T*>(x), x_stride, target, static_cast<const A*>(weight),
            static_cast<const A*>(terms), rows, classes, static_cast<T*>(dx));
    return cudaGetLastError();
  });
}

}  // namespace stablekernels::cuda
