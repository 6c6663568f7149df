// CUDA cross-entropy from logits with class targets (DESIGN.md; stablekernels/backends/
// torch_ce.py for the formulas). No torch header.
//
// Forward: a block per row; each thread folds its elements into (m, s') and, with label
// smoothing, into sum_c w_c (m - x_c) (moved to a new max as a + (m_new - m) W: every term
// >= 0); states merge across the warp and the block. Backward: an elementwise map from the
// saved lse (hi + lo) and per-row coefficients the binding computes.
#include "common.cuh"

namespace stablekernels::cuda {
namespace detail {
namespace {

constexpr int kRowThreads = 512;

template <typename A>
struct CeState {
  RowState<A> st;
  A gaps;     // sum of w_c (st.m - x_c)
  A weights;  // sum of w_c
};

template <typename A>
__device__ __forceinline__ CeState<A> merge_ce(CeState<A> a, CeState<A> b) {
  const RowState<A> st = merge(a.st, b.st);
  A gaps = a.gaps + b.gaps;
  if (a.weights > 0) gaps += (st.m - a.st.m) * a.weights;
  if (b.weights > 0) gaps += (st.m - b.st.m) * b.weights;
  return {st, gaps, a.weights + b.weights};
}

template <typename A>
__device__ __forceinline__ CeState<A> shfl_xor_ce(CeState<A> c, int offset) {
  return {shfl_xor(c.st, offset), __shfl_xor_sync(0xffffffffu, c.gaps, offset),
          __shfl_xor_sync(0xffffffffu, c.weights, offset)};
}

template <typename A>
__device__ __forceinline__ CeState<A> block_merge_ce(CeState<A> c) {
  constexpr int kWarps = kRowThreads / 32;
  __shared__ A sm[kWarps], ss[kWarps], sg[kWarps], sw[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) c = merge_ce(c, shfl_xor_ce(c, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = c.st.m;
    ss[warp] = c.st.s;
    sg[warp] = c.gaps;
    sw[warp] = c.weights;
  }
  __syncthreads();
  c = lane < kWarps ? CeState<A>{{sm[lane], ss[lane]}, sg[lane], sw[lane]}
                    : CeState<A>{RowState<A>::empty(), A(0), A(0)};
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) c = merge_ce(c, shfl_xor_ce(c, offset));
  __syncthreads();
  return c;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_forward_kernel(const T* __restrict__ x, int64_t x_stride,
                                 const int64_t* __restrict__ target,
                                 const acc_of<T>* __restrict__ weight, int64_t rows,
                                 int64_t classes, int64_t ignore_index, double eps, double z,
                                 acc_of<T>* __restrict__ loss, double* __restrict__ lse) {
  using A = acc_of<T>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    CeState<A> c{RowState<A>::empty(), A(0), A(0)};
    for (int64_t j = threadIdx.x; j < classes; j += kRowThreads) {
      const A v = to_acc<A>(xr[j]);
      const A m_before = c.st.m;
      c.st.update(v);
      if (eps > 0) {
        const A w = weight == nullptr ? A(1) : weight[j];
        if (c.weights > 0 && c.st.m > m_before) c.gaps += (c.st.m - m_before) * c.weights;
        c.gaps += w * (isinf(v) && v < 0 ? infinity<A>() : c.st.m - v);
        c.weights += w;
      }
    }
    c = block_merge_ce(c);
    if (threadIdx.x != 0) continue;
    const double m = static_cast<double>(c.st.m);
    const double log_rest = static_cast<double>(log1p_of(c.st.s));
    const double value = isnan(c.st.s) ? static_cast<double>(NAN) : isinf(m) ? m : m + log_rest;
    lse[row] = value;
    const int64_t t = target[row];
    if (t != ignore_index && (t < 0 || t >= classes)) {  // out of range: NaN, never read
      loss[row] = quiet_nan<A>();
      continue;
    }
    if (t == ignore_index) {
      loss[row] = A(0);
      continue;
    }
    if (!isfinite(m)) {  // a +inf, a NaN or only -inf in the row: NaN, as torch
      loss[row] = quiet_nan<A>();
      continue;
    }
    const double w_t = weight == nullptr ? 1.0 : static_cast<double>(weight[t]);
    double result = (1 - eps) * w_t * ((m - static_cast<double>(to_acc<A>(xr[t]))) + log_rest);
    if (eps > 0) {
      result += eps / static_cast<double>(classes) *
                (static_cast<double>(c.gaps) + static_cast<double>(c.weights) * log_rest);
    }
    loss[row] = static_cast<A>(result + z * value * value);
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    cross_entropy_backward_kernel(const T* __restrict__ x, int64_t x_stride,
                                  const int64_t* __restrict__ target,
                                  const acc_of<T>* __restrict__ weight,
                                  const acc_of<T>* __restrict__ row_terms, int64_t rows,
                                  int64_t classes, T* __restrict__ dx) {
  using A = acc_of<T>;
  const int64_t total = rows * classes;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / classes, c = e % classes;
    // row_terms: hi, lo, coef, smooth, one_hot for each row
    const A* terms = row_terms + row * 5;
    const A p = exp((to_acc<A>(x[row * x_stride + c]) - terms[0]) - terms[1]);
    A d = p * terms[2] - terms[3] * (weight == nullptr ? A(1) : weight[c]);
    if (c == target[row]) d -= terms[4];
    dx[e] = from_acc<T>(d);
  }
}

}  // namespace
}  // namespace detail

cudaError_t cross_entropy_forward(const void* x, Dtype x_type, int64_t x_stride,
                                  const int64_t* target, const void* weight, int64_t rows,
                                  int64_t classes, int64_t ignore_index, double label_smoothing,
                                  double z_loss, void* loss, double* lse, cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) -> cudaError_t {
    using T = decltype(xt);
    using A = detail::acc_of<T>;
    if (rows == 0) return cudaSuccess;
    detail::cross_entropy_forward_kernel<T>
        <<<detail::grid_size(rows), detail::kRowThreads, 0, stream>>>(
            static_cast<const T*>(x), x_stride, target, static_cast<const A*>(weight), rows,
            classes, ignore_index, label_smoothing, z_loss, static_cast<A*>(loss), lse);
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_backward(const void* x, Dtype x_type, int64_t x_stride,
                                   const int64_t* target, const void* weight, const void* row_terms,
                                   int64_t rows, int64_t classes, void* dx, cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) -> cudaError_t {
    using T = decltype(xt);
    using A = detail::acc_of<T>;
    const int64_t total = rows * classes;
    if (total == 0) return cudaSuccess;
    detail::cross_entropy_backward_kernel<T>
        <<<detail::grid_size(detail::ceil_div(total, 256)), 256, 0, stream>>>(
            static_cast<const T*>(x), x_stride, target, static_cast<const A*>(weight),
            static_cast<const A*>(row_terms), rows, classes, static_cast<T*>(dx));
    return cudaGetLastError();
  });
}

}  // namespace stablekernels::cuda
