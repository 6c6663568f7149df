// CUDA cross-entropy from logits with class targets (docs/design.md). No torch header. The
// bandwidth model: docs/cuda_model.md.
//
// Two pairs of kernels share one walk of the rows per direction:
// - cross_entropy_forward / cross_entropy_backward: the row pieces (nll, smooth, lse), which
//   stablekernels/_numerics.py combines into the loss and the per-row terms of dx, and the
//   map from those terms (the linear cross-entropy uses these);
// - cross_entropy_loss_forward / cross_entropy_loss_backward: the loss and dx in one kernel
//   per direction (plus one block for the "sum"/"mean" reduction), the per-row algebra of
//   stablekernels/cross_entropy_rows.h applied in the kernels.
//
// Forward: a block per row walks it in tiles of kTileItems 16-byte packs per thread, every
// load of a tile issued before its first exp. Each thread keeps the two-pass sums of its
// elements against its running max (SumsAtMax, online_softmax.h): a tile whose max is higher
// moves them with one exp, then each element costs one exp. With label smoothing it also keeps
// sum_c w_c (m - x_c) (moved to a new max as a + (m_new - m) W: every term >= 0). The block
// reduces the threads' states (two levels of cub's WarpReduce, common.cuh) and thread 0 has
// the row's nll, smooth and lse, from the target logit (and class weight) it read before the
// walk; what it writes from them is the kernel's epilogue (RowPieces, RowLoss). The loss
// kernel's "sum" and "mean" write each row's LossTotals to a scratch buffer, and one block
// (cross_entropy_loss_reduce_kernel) adds them in a fixed order: bitwise the same run to run.
// Backward: a block per row, the same tiles, one exp per element from per-row terms, read
// (the router computes them) or computed by every thread from the loss's gradient
// (RowTermsRead, RowTermsOfLoss).
#include <stablekernels/cross_entropy_rows.h>

#include "common.cuh"

namespace stablekernels::cuda {
namespace detail {
namespace {

constexpr int kTileItems = 4;  // 16-byte packs per thread per tile
constexpr int kBackwardThreads = 256;
constexpr int kReduceThreads = 512;  // the one block of cross_entropy_loss_reduce_kernel

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

// ---------------------------------------------------------------------------------------
// Forward. An epilogue Out has read(row, xr, classes, in_range), which thread 0 calls before
// the row's walk (its loads come before the walk's first exp; it may clear in_range, asserted
// once the block's rows are done), and write(row, target, nll, smooth, lse, W), which thread
// 0 calls after the block's reduction.

// What thread 0 reads of a row's target before the walk.
template <typename A>
struct TargetRead {
  A x;           // the target's logit
  A w;           // its class weight w_t (1 without weights)
  bool counted;  // the row counts (its target is not ignore_index)
};

// cross_entropy_forward: the pieces (nll, smooth, lse) of every row; targets in [0, classes).
template <typename A>
struct RowPieces {
  const int64_t* target;
  double* nll;
  double* smooth;
  double* lse;

  template <typename T>
  __device__ __forceinline__ TargetRead<A> read(int64_t row, const T* xr, int64_t classes,
                                                bool&) const {
    const int64_t t = target[row];
    SK_DEVICE_ASSERT(t >= 0 && t < classes);  // as torch's nll_loss: no read outside the row
    return {to_acc<A>(xr[t]), A(1), true};
  }

  __device__ __forceinline__ void write(int64_t row, const TargetRead<A>&, double row_nll,
                                        double row_smooth, double row_lse, A) const {
    lse[row] = row_lse;
    nll[row] = row_nll;
    smooth[row] = row_smooth;
  }
};

// A row's LossTotals (cross_entropy_rows.h) as scratch holds it: kTotalsFields doubles
// (loss, z, weight, counted), 16-byte aligned.
constexpr int64_t kTotalsFields = kCrossEntropyTotalsFields;
static_assert(sizeof(LossTotals) == kTotalsFields * sizeof(double), "LossTotals: 4 doubles");

__device__ __forceinline__ void store_totals(double* __restrict__ at, const LossTotals& t) {
  *reinterpret_cast<Pack<double, 2>*>(at) = {{t.loss, t.z}};
  *reinterpret_cast<Pack<double, 2>*>(at + 2) = {{t.weight, t.counted}};
}

__device__ __forceinline__ LossTotals load_totals(const double* __restrict__ at) {
  const Pack<double, 2> a = *reinterpret_cast<const Pack<double, 2>*>(at);
  const Pack<double, 2> b = *reinterpret_cast<const Pack<double, 2>*>(at + 2);
  LossTotals t;
  t.loss = a.v[0];
  t.z = a.v[1];
  t.weight = b.v[0];
  t.counted = b.v[1];
  return t;
}

// cross_entropy_loss_forward: lse of every row; "none": the row's loss; "sum", "mean": the
// row's LossTotals into scratch (added by cross_entropy_loss_reduce_kernel). Row 0 also
// writes counts[2] = W with label smoothing (the walk sums the weights only then), else 0,
// and for "none" counts[0] = counts[1] = 0 (the rows are not counted).
template <typename A>
struct RowLoss {
  const int64_t* target;
  const A* weight;  // nullable
  CrossEntropyOptions options;
  A* loss;
  double* lse;
  double* counts;
  double* scratch;

  template <typename T>
  __device__ __forceinline__ TargetRead<A> read(int64_t row, const T* xr, int64_t,
                                                bool& in_range) const {
    const int64_t t = target[row];
    const bool readable = target_in_range(t, options);
    in_range = in_range && readable;
    // 0 on a row that does not count (or whose target is out of range: asserted later).
    const int64_t c = readable ? readable_target(t, options) : 0;
    return {to_acc<A>(xr[c]), weight == nullptr ? A(1) : weight[c], row_counts(t, options)};
  }

  __device__ __forceinline__ void write(int64_t row, const TargetRead<A>& t, double nll,
                                        double smooth, double row_lse, A weights) const {
    lse[row] = row_lse;
    const double w_t = static_cast<double>(t.w);
    if (options.reduction == Reduction::kNone) {
      loss[row] = static_cast<A>(row_loss(nll, smooth, row_lse, w_t, t.counted, options));
    } else {
      LossTotals one;
      one.add(nll, smooth, row_lse, w_t, t.counted, options);
      store_totals(scratch + row * kTotalsFields, one);
    }
    if (row == 0) {  // every element of counts written: no op output is left uninitialised
      counts[2] = options.label_smoothing != 0 ? static_cast<double>(weights) : 0.0;
      if (options.reduction == Reduction::kNone) counts[0] = counts[1] = 0.0;  // not counted
    }
  }
};

// The walk of rows [blockIdx.x, rows) (grid-stride), a block of THREADS per row, and `out`'s
// epilogue per row. smoothing: the walk also sums the gaps and the weights (else 0).
template <typename T, int THREADS, typename Out>
__device__ __forceinline__ void cross_entropy_rows(const T* __restrict__ x, int64_t x_stride,
                                                   const acc_of<T>* __restrict__ weight,
                                                   int64_t rows, int64_t classes, bool smoothing,
                                                   const Out& out) {
  using A = acc_of<T>;
  constexpr int kVec = kPack<T>;
  constexpr int64_t kTile = int64_t(THREADS) * kTileItems * kVec;
  const int lane = static_cast<int>(threadIdx.x);
  bool in_range = true;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    TargetRead<A> target{A(0), A(0), false};
    if (lane == 0) target = out.read(row, xr, classes, in_range);
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
    const double nll = (row_m - static_cast<double>(target.x)) + log_rest;
    const double smooth =
        smoothing ? static_cast<double>(c.gaps) + static_cast<double>(c.weights) * log_rest : 0.0;
    out.write(row, target, nll, smooth, finish_lse<double>(c.st), c.weights);
  }
  SK_DEVICE_ASSERT(in_range);  // every counted target in [0, classes)
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
    cross_entropy_forward_kernel(const T* __restrict__ x, int64_t x_stride,
                                 const int64_t* __restrict__ target,
                                 const acc_of<T>* __restrict__ weight, int64_t rows,
                                 int64_t classes, bool smoothing, double* __restrict__ nll,
                                 double* __restrict__ smooth, double* __restrict__ lse) {
  cross_entropy_rows<T, THREADS>(x, x_stride, weight, rows, classes, smoothing,
                                 RowPieces<acc_of<T>>{target, nll, smooth, lse});
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
    cross_entropy_loss_forward_kernel(const T* __restrict__ x, int64_t x_stride,
                                      const int64_t* __restrict__ target,
                                      const acc_of<T>* __restrict__ weight, int64_t rows,
                                      CrossEntropyOptions options, acc_of<T>* __restrict__ loss,
                                      double* __restrict__ lse, double* __restrict__ counts,
                                      double* __restrict__ scratch) {
  cross_entropy_rows<T, THREADS>(
      x, x_stride, weight, rows, options.classes, options.label_smoothing != 0,
      RowLoss<acc_of<T>>{target, weight, options, loss, lse, counts, scratch});
}

// The field-wise sum of two LossTotals: the reduction's operator (the rows' totals are sums).
struct AddTotals {
  __device__ __forceinline__ LossTotals operator()(const LossTotals& a, const LossTotals& b) const {
    LossTotals t;
    t.loss = a.loss + b.loss;
    t.z = a.z + b.z;
    t.weight = a.weight + b.weight;
    t.counted = a.counted + b.counted;
    return t;
  }
};

// One block of kReduceThreads: thread i adds rows i, i + kReduceThreads, ... in row order,
// then cub's BlockReduce adds the threads' totals in its fixed tree (no atomics: the same
// order, so the same bits, on every run). loss[0] = the reduced loss, rounded once to A;
// counts[0] = sum of counted w_t, counts[1] = counted rows.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads)
    cross_entropy_loss_reduce_kernel(const double* __restrict__ scratch, int64_t rows,
                                     CrossEntropyOptions options, A* __restrict__ loss,
                                     double* __restrict__ counts) {
  LossTotals totals;
#pragma unroll 4
  for (int64_t row = threadIdx.x; row < rows; row += kReduceThreads) {
    totals = AddTotals{}(totals, load_totals(scratch + row * kTotalsFields));
  }
  using Reduce = cub::BlockReduce<LossTotals, kReduceThreads>;
  __shared__ typename Reduce::TempStorage temp;
  totals = Reduce(temp).Reduce(totals, AddTotals{});
  if (threadIdx.x != 0) return;
  loss[0] = static_cast<A>(totals.result(options));
  counts[0] = totals.weight;
  counts[1] = totals.counted;
}

// ---------------------------------------------------------------------------------------
// Backward. A Terms source gives each row's RowTerms (cross_entropy_rows.h) and the class of
// its one-hot term (-1: none), read by every thread of the row's block before its walk.

template <typename A>
struct RowMap {
  RowTerms<A> k;
  int64_t one_hot_class;
};

// cross_entropy_backward: terms (rows, 5) = (hi, lo, coef, smooth, one_hot), the router's.
template <typename A>
struct RowTermsRead {
  const A* terms;
  const int64_t* target;

  __device__ __forceinline__ RowMap<A> operator()(int64_t row, bool&) const {
    const A* k5 = terms + row * 5;
    return {{k5[0], k5[1], k5[2], k5[3], k5[4]}, target[row]};
  }
};

// cross_entropy_loss_backward: the terms from the loss's gradient, the forward's lse and
// counts, by row_gradient and row_terms. A counted target outside [0, classes) reads class 0
// and clears `in_range`, which the kernel asserts after its rows (an assert's call inside the
// row loop would cost the whole loop registers).
template <typename A>
struct RowTermsOfLoss {
  const A* grad_loss;
  int64_t grad_loss_stride;  // 0: one value for every row
  const double* grad_lse;    // nullable
  int64_t grad_lse_stride;
  const int64_t* target;
  const A* weight;  // nullable
  const double* lse;
  const double* counts;
  CrossEntropyOptions options;

  __device__ __forceinline__ RowMap<A> operator()(int64_t row, bool& in_range) const {
    const int64_t t = target[row];
    const bool readable = target_in_range(t, options);
    in_range = in_range && readable;
    const bool counted = row_counts(t, options);
    const int64_t c = readable ? readable_target(t, options) : 0;
    const double w_t = weight == nullptr ? 1.0 : static_cast<double>(weight[c]);
    const RowGradient g = row_gradient(static_cast<double>(grad_loss[row * grad_loss_stride]),
                                       counted, counts, options);
    const double g_lse = grad_lse == nullptr ? 0.0 : grad_lse[row * grad_lse_stride];
    // counts[2] (W) is read by row_terms only with label smoothing.
    return {row_terms<A>(g, g_lse, lse[row], w_t, counts[2], options), counted ? t : int64_t(-1)};
  }
};

// dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c - [c == one_hot_class] * one_hot, the
// terms per row from `terms`.
template <typename T, typename Terms>
__device__ __forceinline__ void cross_entropy_dx_rows(const T* __restrict__ x, int64_t x_stride,
                                                      const acc_of<T>* __restrict__ weight,
                                                      int64_t rows, int64_t classes,
                                                      T* __restrict__ dx, const Terms& terms) {
  using A = acc_of<T>;
  constexpr int kVec = kPack<T>;
  constexpr int64_t kTile = int64_t(kBackwardThreads) * kTileItems * kVec;
  const int lane = static_cast<int>(threadIdx.x);
  bool in_range = true;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    T* dr = dx + row * classes;
    const RowMap<A> r = terms(row, in_range);
    const A hi = r.k.hi, lo = r.k.lo, coef = r.k.coef, smooth = r.k.smooth;
    const A one_hot = r.k.one_hot;
    const int64_t t = r.one_hot_class;
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
  SK_DEVICE_ASSERT(in_range);  // every counted target in [0, classes)
}

template <typename T>
__global__ void __launch_bounds__(kBackwardThreads)
    cross_entropy_backward_kernel(const T* __restrict__ x, int64_t x_stride,
                                  const int64_t* __restrict__ target,
                                  const acc_of<T>* __restrict__ weight,
                                  const acc_of<T>* __restrict__ terms, int64_t rows,
                                  int64_t classes, T* __restrict__ dx) {
  cross_entropy_dx_rows(x, x_stride, weight, rows, classes, dx,
                        RowTermsRead<acc_of<T>>{terms, target});
}

template <typename T>
__global__ void __launch_bounds__(kBackwardThreads) cross_entropy_loss_backward_kernel(
    const acc_of<T>* __restrict__ grad_loss, int64_t grad_loss_stride,
    const double* __restrict__ grad_lse, int64_t grad_lse_stride, const T* __restrict__ x,
    int64_t x_stride, const int64_t* __restrict__ target, const acc_of<T>* __restrict__ weight,
    const double* __restrict__ lse, const double* __restrict__ counts, int64_t rows,
    CrossEntropyOptions options, T* __restrict__ dx) {
  cross_entropy_dx_rows(
      x, x_stride, weight, rows, options.classes, dx,
      RowTermsOfLoss<acc_of<T>>{grad_loss, grad_loss_stride, grad_lse, grad_lse_stride, target,
                                weight, lse, counts, options});
}

// Rows of up to one tile of 128 threads take 128 threads, longer ones 512.
template <typename T>
bool short_rows(int64_t classes) {
  return classes <= int64_t(128) * kTileItems * kPack<T>;
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
    if (detail::short_rows<T>(classes)) {
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

cudaError_t cross_entropy_loss_forward(const void* x, Dtype x_type, int64_t x_stride,
                                       const int64_t* target, const void* weight, int64_t rows,
                                       const CrossEntropyOptions& options, void* loss, double* lse,
                                       double* counts, double* scratch, cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) -> cudaError_t {
    using T = decltype(xt);
    using A = acc_of<T>;
    const auto* xp = static_cast<const T*>(x);
    const auto* w = static_cast<const A*>(weight);
    auto* out = static_cast<A*>(loss);
    const unsigned grid = detail::grid_size(rows);
    if (detail::short_rows<T>(options.classes)) {
      detail::cross_entropy_loss_forward_kernel<T, 128><<<grid, 128, 0, stream>>>(
          xp, x_stride, target, w, rows, options, out, lse, counts, scratch);
    } else {
      detail::cross_entropy_loss_forward_kernel<T, 512><<<grid, 512, 0, stream>>>(
          xp, x_stride, target, w, rows, options, out, lse, counts, scratch);
    }
    if (options.reduction != Reduction::kNone) {
      const cudaError_t launched = cudaGetLastError();
      if (launched != cudaSuccess) return launched;
      detail::cross_entropy_loss_reduce_kernel<A>
          <<<1, detail::kReduceThreads, 0, stream>>>(scratch, rows, options, out, counts);
    }
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_loss_backward(const void* grad_loss, int64_t grad_loss_stride,
                                        const double* grad_lse, int64_t grad_lse_stride,
                                        const void* x, Dtype x_type, int64_t x_stride,
                                        const int64_t* target, const void* weight,
                                        const double* lse, const double* counts, int64_t rows,
                                        const CrossEntropyOptions& options, void* dx,
                                        cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) -> cudaError_t {
    using T = decltype(xt);
    using A = acc_of<T>;
    detail::cross_entropy_loss_backward_kernel<T>
        <<<detail::grid_size(rows), detail::kBackwardThreads, 0, stream>>>(
            static_cast<const A*>(grad_loss), grad_loss_stride, grad_lse, grad_lse_stride,
            static_cast<const T*>(x), x_stride, target, static_cast<const A*>(weight), lse, counts,
            rows, options, static_cast<T*>(dx));
    return cudaGetLastError();
  });
}

}  // namespace stablekernels::cuda
