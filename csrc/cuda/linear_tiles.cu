// CUDA tile epilogues of the linear cross-entropy (stablekernels/linear_tiles.h: the rules, the
// per-row state and its merge, shared with the CPU kernels). No torch header.
//
// Forward (cross_entropy_tile_forward_kernel): a block per row of the tile (grid-stride), two
// walks of the row: the first takes its max (each element transformed on load: temperature,
// softcap), the second its sums at that max (SumsAtMax, online_softmax.h), the smoothing gaps
// and weights, the entropy sum and the target's logit; the block reduces them (common.cuh),
// and thread 0 merges the row's part into its float64 state (merge_tile_row). The tile is only
// read (an L2-resident re-read on the second walk: a tile is at most 4096 columns wide except
// in the forward with gradient, whose one tile is the whole vocabulary).
// Backward (cross_entropy_tile_backward_kernel): a block per row, a pure map overwriting the
// tile with the gradient along it (tile_gradient), one exp per element.
#include <stablekernels/linear_tiles.h>

#include "common.cuh"

namespace stablekernels::cuda {
namespace detail {
namespace {

constexpr int kTileThreads = 256;

// A thread's sums of the second walk, at the row's max m.
template <typename A>
struct TileSums {
  SumsAtMax<A> at;
  A gaps, weights, ent, z_t;

  static __device__ __forceinline__ TileSums empty() {
    return {SumsAtMax<A>::empty(), A(0), A(0), A(0), A(0)};
  }
};

struct AddTileSums {
  template <typename A>
  __device__ __forceinline__ TileSums<A> operator()(const TileSums<A>& a,
                                                    const TileSums<A>& b) const {
    return {a.at + b.at, a.gaps + b.gaps, a.weights + b.weights, a.ent + b.ent, a.z_t + b.z_t};
  }
};

template <typename A>
__global__ void __launch_bounds__(kTileThreads)
    cross_entropy_tile_forward_kernel(const A* __restrict__ y, int64_t rows, int64_t n,
                                      const int64_t* __restrict__ target, int64_t class_start,
                                      const A* __restrict__ weight, LogitTransform<A> f,
                                      bool smoothing, bool entropy, double* __restrict__ state) {
  const int lane = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const A* yr = y + row * n;
    const int64_t local = target[row] - class_start;
    A m = -infinity<A>();
    for (int64_t j = lane; j < n; j += kTileThreads) m = fmax(m, f.apply(yr[j]));
    m = block_reduce_all<kTileThreads>(m, Max{});
    TileSums<A> sums = TileSums<A>::empty();
    const bool finite_max = isfinite(m);
    for (int64_t j = lane; j < n; j += kTileThreads) {
      const A z = f.apply(yr[j]);
      const A e = sums.at.add(z, m);
      if (j == local) sums.z_t = z;
      if (smoothing) {
        const A w = weight == nullptr ? A(1) : weight[class_start + j];
        if (w != A(0)) sums.gaps += gap_term(z, m, w);
        sums.weights += w;
      }
      if (entropy && finite_max) sums.ent += entropy_term(z, m, e);
    }
    sums = block_reduce<kTileThreads>(sums, AddTileSums{});
    if (lane != 0) continue;
    const RowState<A> st = state_at_max(m, sums.at, static_cast<A>(n));
    const double s = static_cast<double>(st.s);
    const TilePart part{static_cast<double>(st.m), s, static_cast<double>(sums.gaps),
                        static_cast<double>(sums.weights),
                        finite_max && !isnan(s) ? static_cast<double>(sums.ent) : 0.0};
    merge_tile_row(state + row * kTileStateFields, part, class_start == 0,
                   local >= 0 && local < n, static_cast<double>(sums.z_t));
  }
}

template <typename A>
__global__ void __launch_bounds__(kTileThreads)
    cross_entropy_tile_backward_kernel(A* __restrict__ y, int64_t rows, int64_t n,
                                       const int64_t* __restrict__ target, int64_t class_start,
                                       const A* __restrict__ weight,
                                       const A* __restrict__ terms, LogitTransform<A> f,
                                       const A* __restrict__ grad_entropy) {
  const int lane = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    A* yr = y + row * n;
    const int64_t local = target[row] - class_start;
    const A* k = terms + row * 5;
    const A hi = k[0], lo = k[1], coef = k[2], smooth = k[3], one_hot = k[4];
    const A g = grad_entropy == nullptr ? A(0) : grad_entropy[row];
    for (int64_t j = lane; j < n; j += kTileThreads) {
      A t = A(0);
      const A z = f.apply(yr[j], &t);
      const A w = weight == nullptr ? A(1) : weight[class_start + j];
      yr[j] = tile_gradient(z, t, hi, lo, coef, smooth, one_hot, w, j == local, g, f);
    }
  }
}

template <typename F>
cudaError_t with_tile_type(Dtype type, F f) {
  if (type == Dtype::kFloat32) return f(float{});
  if (type == Dtype::kFloat64) return f(double{});
  return cudaErrorInvalidValue;
}


}  // namespace
}  // namespace detail

cudaError_t cross_entropy_tile_forward(const void* y, Dtype type, int64_t rows, int64_t n,
                                       const int64_t* target, int64_t class_start,
                                       const void* weight, double softcap, double temperature,
                                       bool smoothing, bool entropy, double* state,
                                       cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  return detail::with_tile_type(type, [&](auto a) {
    using A = decltype(a);
    detail::cross_entropy_tile_forward_kernel<A>
        <<<detail::grid_size(rows), detail::kTileThreads, 0, stream>>>(
            static_cast<const A*>(y), rows, n, target, class_start, static_cast<const A*>(weight),
            LogitTransform<A>::make(softcap, temperature), smoothing, entropy, state);
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_tile_backward(void* y, Dtype type, int64_t rows, int64_t n,
                                        const int64_t* target, int64_t class_start,
                                        const void* weight, const void* terms, double softcap,
                                        double temperature, const void* grad_entropy,
                                        cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  return detail::with_tile_type(type, [&](auto a) {
    using A = decltype(a);
    detail::cross_entropy_tile_backward_kernel<A>
        <<<detail::grid_size(rows), detail::kTileThreads, 0, stream>>>(
            static_cast<A*>(y), rows, n, target, class_start, static_cast<const A*>(weight),
            static_cast<const A*>(terms), LogitTransform<A>::make(softcap, temperature),
            static_cast<const A*>(grad_entropy));
    return cudaGetLastError();
  });
}

}  // namespace stablekernels::cuda
