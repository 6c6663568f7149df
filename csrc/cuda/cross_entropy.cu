// CUDA cross-entropy statistics from logits with class targets (docs/design.md;
// stablekernels/_numerics.py combines them into the loss and its gradient). No torch header.
//
// Forward: a block per row; each thread folds its elements into (m, s') and, with label
// smoothing, into sum_c w_c (m - x_c) (moved to a new max as a + (m_new - m) W: every term
// >= 0); the block reduces them (two levels of cub's WarpReduce, common.cuh) and thread 0
// writes the row's nll, smooth and lse. Backward: an elementwise map from the per-row terms the
// router computes.
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

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_forward_kernel(const T* __restrict__ x, int64_t x_stride,
                                 const int64_t* __restrict__ target,
                                 const acc_of<T>* __restrict__ weight, int64_t rows,
                                 int64_t classes, bool smoothing, double* __restrict__ nll,
                                 double* __restrict__ smooth, double* __restrict__ lse) {
  using A = acc_of<T>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    CeState<A> c = CeState<A>::empty();
    for (int64_t j = threadIdx.x; j < classes; j += kRowThreads) {
      const A v = to_acc<A>(xr[j]);
      const A m_before = c.st.m;
      c.st.update(v);
      if (smoothing) {
        const A w = weight == nullptr ? A(1) : weight[j];
        if (c.weights > 0 && c.st.m > m_before) c.gaps += (c.st.m - m_before) * c.weights;
        c.gaps += w * (isinf(v) && v < 0 ? infinity<A>() : c.st.m - v);
        c.weights += w;
      }
    }
    c = block_reduce<kRowThreads>(c, MergeCe{});
    if (threadIdx.x != 0) continue;
    const double m = static_cast<double>(c.st.m);
    const double log_rest = static_cast<double>(log1p(c.st.s));
    lse[row] = finish_lse<double>(c.st);
    const int64_t t = target[row];
    SK_DEVICE_ASSERT(t >= 0 && t < classes);  // as torch's nll_loss: no read outside the row
    nll[row] = (m - static_cast<double>(to_acc<A>(xr[t]))) + log_rest;
    smooth[row] =
        smoothing ? static_cast<double>(c.gaps) + static_cast<double>(c.weights) * log_rest : 0.0;
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    cross_entropy_backward_kernel(const T* __restrict__ x, int64_t x_stride,
                                  const int64_t* __restrict__ target,
                                  const acc_of<T>* __restrict__ weight,
                                  const acc_of<T>* __restrict__ terms, int64_t rows,
                                  int64_t classes, T* __restrict__ dx) {
  using A = acc_of<T>;
  const int64_t total = rows * classes;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / classes, c = e % classes;
    const A* k = terms + row * 5;  // hi, lo, coef, smooth, one_hot
    const A p = exp((to_acc<A>(x[row * x_stride + c]) - k[0]) - k[1]);
    A d = p * k[2] - k[3] * (weight == nullptr ? A(1) : weight[c]);
    if (c == target[row]) d -= k[4];
    dx[e] = from_acc<T>(d);
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
    detail::cross_entropy_forward_kernel<T>
        <<<detail::grid_size(rows), detail::kRowThreads, 0, stream>>>(
            static_cast<const T*>(x), x_stride, target, static_cast<const acc_of<T>*>(weight), rows,
            classes, smoothing, nll, smooth, lse);
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
        <<<detail::grid_size(detail::ceil_div(rows * classes, 256)), 256, 0, stream>>>(
            static_cast<const T*>(x), x_stride, target, static_cast<const A*>(weight),
            static_cast<const A*>(terms), rows, classes, static_cast<T*>(dx));
    return cudaGetLastError();
  });
}

}  // namespace stablekernels::cuda
