// A host twin of the CUDA row kernels' arithmetic (csrc/cuda/softmax.cu), compiled by
// tests/test_cuda_twin.py into a small shared library and checked against the float64
// reference with the accuracy tests' bounds. It runs the same header code as the kernels
// (stablekernels/online_softmax.h): the max of a piece first, one exp per element against it
// (SumsAtMax), the piece's state (state_at_max), pieces merged by the merge rule (the split
// path), and outputs exp(x - m) * softmax_scale or (x - m) - log_softmax_shift. What differs
// on the GPU: the order of the sums (a tree over threads), exp (CUDA's expf, within 2 ulp),
// and the float reciprocal (rcp.approx and a Newton step, within 1 ulp of the rounded one).
// The masked kernels (csrc/cuda/masked_softmax.cu) are twinned below the plain ones: the
// scores t, the causal limit, the long rows' walk with running maxima, and the dead rows;
// and the masked backward: the row's sum, the plain backward's value, and the rule of
// stablekernels/masked_rows.h (scale, dead rows, dropped log_softmax elements).
// Then the fused cross-entropy loss (csrc/cuda/cross_entropy.cu): its walk in tiles, the
// block's tree of states, the epilogue and reduction of stablekernels/cross_entropy_rows.h,
// and the backward's map.
#include <stablekernels/cross_entropy_rows.h>
#include <stablekernels/masked_rows.h>
#include <stablekernels/online_softmax.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using stablekernels::CrossEntropyOptions;
using stablekernels::log_softmax_shift;
using stablekernels::LossTotals;
using stablekernels::merge;
using stablekernels::readable_target;
using stablekernels::Reduction;
using stablekernels::row_counts;
using stablekernels::row_gradient;
using stablekernels::row_loss;
using stablekernels::row_terms;
using stablekernels::RowGradient;
using stablekernels::RowTerms;
using stablekernels::RowState;
using stablekernels::softmax_scale;
using stablekernels::state_at_max;
using stablekernels::SumsAtMax;
using stablekernels::target_in_range;

constexpr int64_t kThreadElements = 32;  // what one thread of a row kernel holds

// The sums of x[begin, end) against m as a kernel forms them: each thread's elements in
// sequence, then the threads' sums pairwise (the shuffle and block trees).
template <typename A>
SumsAtMax<A> piece_sums(const A* x, int64_t begin, int64_t end, A m) {
  if (end - begin <= kThreadElements) {
    SumsAtMax<A> sums = SumsAtMax<A>::empty();
    for (int64_t j = begin; j < end; ++j) sums.add(x[j], m);
    return sums;
  }
  int64_t threads = 1;
  while (threads * kThreadElements < end - begin) threads *= 2;
  const int64_t half = begin + threads / 2 * kThreadElements;
  return piece_sums(x, begin, half, m) + piece_sums(x, half, end, m);
}

// The state of x[0, n) taken in pieces of `piece` elements, as the row kernels (one piece)
// and the split path (row_parts_kernel, merge_parts_kernel) do.
template <typename A>
RowState<A> row_state(const A* x, int64_t n, int64_t piece) {
  RowState<A> st = RowState<A>::empty();
  for (int64_t begin = 0; begin < n; begin += piece) {
    const int64_t end = begin + piece < n ? begin + piece : n;
    A m = -static_cast<A>(INFINITY);
    for (int64_t j = begin; j < end; ++j) m = std::fmax(m, x[j]);
    st = merge(st, state_at_max(m, piece_sums(x, begin, end, m), static_cast<A>(end - begin)));
  }
  return st;
}

template <typename A>
void softmax_rows(const A* x, A* y, int64_t rows, int64_t n, int64_t piece, bool log) {
  for (int64_t r = 0; r < rows; ++r) {
    const A* xr = x + r * n;
    const RowState<A> st = row_state(xr, n, piece);
    const A scale = softmax_scale(st), shift = log_softmax_shift(st);
    for (int64_t j = 0; j < n; ++j) {
      y[r * n + j] = log ? (xr[j] - st.m) - shift : std::exp(xr[j] - st.m) * scale;
    }
  }
}

template <typename A>
void logsumexp_rows(const A* x, double* out, int64_t rows, int64_t n, int64_t piece) {
  for (int64_t r = 0; r < rows; ++r) {
    out[r] = stablekernels::finish_lse<double>(row_state(x + r * n, n, piece));
  }
}

// ---------------------------------------------------------------------------------------
// The masked kernels (csrc/cuda/masked_softmax.cu). t_j = scale * x_j (rounded on its own) +
// add_j, or -inf where keep_j is 0 or past the causal limit L = clamp(r % query_len + offset
// + 1, 0, n), which is never read. A row whose L fits `capacity` is held whole (the max first,
// as the register kernel); a longer one is walked in tiles of `tile` elements, each split over
// kWalkThreads threads that keep their sums against their running max (moved by one exp when a
// tile raises it), the threads' states merged (the long kernel). Outputs from the state: a dead
// row (m = -inf, s' not NaN) 0 / -inf throughout, [L, n) as t = -inf.

constexpr int64_t kWalkThreads = 512;  // the long kernel's block

// The states of threads [lo, hi) merged pairwise (the block's shuffle trees).
template <typename A>
RowState<A> merge_tree(const std::vector<RowState<A>>& states, size_t lo, size_t hi) {
  if (hi - lo == 1) return states[lo];
  const size_t mid = lo + (hi - lo) / 2;
  return merge(merge_tree(states, lo, mid), merge_tree(states, mid, hi));
}

template <typename A>
RowState<A> walked_state(const A* t, int64_t len, int64_t tile) {
  const int64_t chunk = (tile + kWalkThreads - 1) / kWalkThreads;
  std::vector<RowState<A>> states;
  for (int64_t w = 0; w < kWalkThreads; ++w) {
    A m = -static_cast<A>(INFINITY);
    SumsAtMax<A> sums = SumsAtMax<A>::empty();
    int64_t count = 0;
    for (int64_t first = 0; first < len; first += tile) {
      const int64_t tile_end = std::min(first + tile, len);
      const int64_t begin = std::min(first + w * chunk, tile_end);
      const int64_t end = std::min(begin + chunk, tile_end);
      A tile_max = -static_cast<A>(INFINITY);
      for (int64_t j = begin; j < end; ++j) tile_max = std::fmax(tile_max, t[j]);
      if (tile_max > m) {
        sums = {(sums.below + sums.at_max) * std::exp(m - tile_max), A(0)};
        m = tile_max;
      }
      for (int64_t j = begin; j < end; ++j) sums.add(t[j], m);
      count += end - begin;
    }
    states.push_back(state_at_max(m, sums, static_cast<A>(count)));
  }
  return merge_tree(states, 0, states.size());
}

template <typename A>
void masked_rows(const A* x, const unsigned char* keep, const A* add, A scale, int64_t rows,
                 int64_t n, bool causal, int64_t query_len, int64_t offset, int64_t capacity,
                 int64_t tile, int mode, A* y, double* lse) {
  const A inf = static_cast<A>(INFINITY);
  std::vector<A> t(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t limit = causal ? std::clamp<int64_t>(r % query_len + offset + 1, 0, n) : n;
    for (int64_t j = 0; j < limit; ++j) {
      volatile A product = scale * x[r * n + j];  // no fma with the addition
      A v = product;
      if (keep != nullptr && keep[r * n + j] == 0) v = -inf;
      if (add != nullptr) v += add[r * n + j];
      t[j] = v;
    }
    RowState<A> st;
    if (limit <= capacity) {
      A m = -inf;
      for (int64_t j = 0; j < limit; ++j) m = std::fmax(m, t[j]);
      st = state_at_max(m, limit > 0 ? piece_sums(t.data(), 0, limit, m) : SumsAtMax<A>::empty(),
                        static_cast<A>(limit));
    } else {
      st = walked_state(t.data(), limit, tile);
    }
    lse[r] = stablekernels::finish_lse<double>(st);
    if (mode == 2) continue;
    const bool log = mode == 1;
    const bool dead = std::isinf(st.m) && st.m < 0 && !std::isnan(st.s);
    const A factor = log ? log_softmax_shift(st) : softmax_scale(st);
    const A dropped = dead ? (log ? -inf : A(0)) : (log ? -inf - factor : A(0) * factor);
    for (int64_t j = 0; j < n; ++j) {
      A out = dropped;
      if (!dead && j < limit) out = log ? (t[j] - st.m) - factor : std::exp(t[j] - st.m) * factor;
      y[r * n + j] = out;
    }
  }
}


// ---------------------------------------------------------------------------------------
// The fused cross-entropy loss (csrc/cuda/cross_entropy.cu, cross_entropy_loss_forward_kernel,
// cross_entropy_loss_reduce_kernel, cross_entropy_loss_backward_kernel), rows 16-byte aligned
// (pack_shift 0). Forward: a block of kCeThreads(n) threads per row; thread `lane` holds, per
// tile of kCeThreads * 4 packs of kPack elements, the packs k * threads + lane (k < 4, padded
// with -inf past the row): the tile's max first (one exp moves its sums and gaps to it when
// it rises), then one exp per element, and with label smoothing sum w_c (m - x_c) and sum w_c.
// The threads' states merge in lane order, pairwise (cub's shuffle trees, both levels), and
// thread 0 applies row_loss or LossTotals::add to the row's pieces. "sum" and "mean": thread i
// of the reduction's 512 adds the rows i, i + 512, ... in order, then cub::BlockReduce adds
// the threads' totals (a shuffle tree per warp, then the warps in order).

constexpr int64_t kCeTileItems = 4;       // kTileItems
constexpr int64_t kCeReduceThreads = 512;  // kReduceThreads

template <typename A>
constexpr int64_t ce_pack() {
  return 16 / static_cast<int64_t>(sizeof(A));
}

// short_rows: up to one tile of 128 threads takes 128 threads, longer rows 512.
template <typename A>
int64_t ce_threads(int64_t classes) {
  return classes <= 128 * kCeTileItems * ce_pack<A>() ? 128 : 512;
}

template <typename A>
struct CeState {
  RowState<A> st;
  A gaps;     // sum of w_c (st.m - x_c)
  A weights;  // sum of w_c
};

// MergeCe of cross_entropy.cu.
template <typename A>
CeState<A> merge_ce(const CeState<A>& a, const CeState<A>& b) {
  const RowState<A> st = merge(a.st, b.st);
  A gaps = a.gaps + b.gaps;
  if (a.weights > 0 && st.m != a.st.m) gaps += (st.m - a.st.m) * a.weights;
  if (b.weights > 0 && st.m != b.st.m) gaps += (st.m - b.st.m) * b.weights;
  return {st, gaps, a.weights + b.weights};
}

template <typename V, typename Op>
V tree(const std::vector<V>& v, size_t lo, size_t hi, Op op) {
  if (hi - lo == 1) return v[lo];
  const size_t mid = lo + (hi - lo) / 2;
  return op(tree(v, lo, mid, op), tree(v, mid, hi, op));
}

// One thread's walk of a row (cross_entropy_rows of cross_entropy.cu).
template <typename A>
CeState<A> ce_thread(const A* xr, const A* weight, int64_t classes, bool smoothing,
                     int64_t threads, int64_t lane) {
  constexpr int64_t kVec = ce_pack<A>();
  const A inf = static_cast<A>(INFINITY);
  const int64_t tile = threads * kCeTileItems * kVec;
  A m = -inf, gaps = 0, weights = 0;
  SumsAtMax<A> sums = SumsAtMax<A>::empty();
  int64_t count = 0;
  for (int64_t first = 0; first < classes; first += tile) {
    A v[kCeTileItems][kVec], w[kCeTileItems][kVec];
    for (int64_t k = 0; k < kCeTileItems; ++k) {
      const int64_t j = first + (k * threads + lane) * kVec;
      for (int64_t e = 0; e < kVec; ++e) {
        const bool in_row = j + e < classes;
        v[k][e] = in_row ? xr[j + e] : -inf;
        w[k][e] = !in_row ? A(0) : weight == nullptr ? A(1) : weight[j + e];
        count += in_row ? 1 : 0;
      }
    }
    A tile_max = -inf;
    for (int64_t k = 0; k < kCeTileItems; ++k) {
      for (int64_t e = 0; e < kVec; ++e) tile_max = std::fmax(tile_max, v[k][e]);
    }
    if (tile_max > m) {
      sums = {(sums.below + sums.at_max) * std::exp(m - tile_max), A(0)};
      if (weights > 0) gaps += (tile_max - m) * weights;
      m = tile_max;
    }
    for (int64_t k = 0; k < kCeTileItems; ++k) {
      for (int64_t e = 0; e < kVec; ++e) {
        const A x = v[k][e];
        sums.add(x, m);
        if (smoothing && w[k][e] != A(0)) {
          gaps += w[k][e] * (std::isinf(x) && x < 0 ? inf : m - x);
          weights += w[k][e];
        }
      }
    }
  }
  return {state_at_max(m, sums, static_cast<A>(count)), gaps, weights};
}

// The field-wise sum of two LossTotals (AddTotals of cross_entropy.cu).
LossTotals add_totals(const LossTotals& a, const LossTotals& b) {
  LossTotals t;
  t.loss = a.loss + b.loss;
  t.z = a.z + b.z;
  t.weight = a.weight + b.weight;
  t.counted = a.counted + b.counted;
  return t;
}

template <typename A>
void ce_loss_rows(const A* x, const int64_t* target, const A* weight, int64_t rows,
                  const CrossEntropyOptions& o, A* loss, double* lse, double* counts) {
  const bool smoothing = o.label_smoothing != 0;
  const int64_t threads = ce_threads<A>(o.classes);
  std::vector<LossTotals> scratch(static_cast<size_t>(rows));
  std::vector<CeState<A>> states(static_cast<size_t>(threads));
  for (int64_t r = 0; r < rows; ++r) {
    const A* xr = x + r * o.classes;
    const int64_t t = target[r];
    const int64_t c = target_in_range(t, o) ? readable_target(t, o) : 0;  // RowLoss::read
    const A x_t = xr[c], w_t = weight == nullptr ? A(1) : weight[c];
    for (int64_t lane = 0; lane < threads; ++lane) {
      states[lane] = ce_thread(xr, weight, o.classes, smoothing, threads, lane);
    }
    const CeState<A> s = tree(states, 0, states.size(), merge_ce<A>);
    const double row_m = static_cast<double>(s.st.m);
    const double log_rest = static_cast<double>(std::log1p(s.st.s));
    const double nll = (row_m - static_cast<double>(x_t)) + log_rest;
    const double smooth =
        smoothing ? static_cast<double>(s.gaps) + static_cast<double>(s.weights) * log_rest : 0.0;
    lse[r] = stablekernels::finish_lse<double>(s.st);
    const bool counted = row_counts(t, o);
    if (o.reduction == Reduction::kNone) {
      loss[r] = static_cast<A>(row_loss(nll, smooth, lse[r], w_t, counted, o));
    } else {
      scratch[r].add(nll, smooth, lse[r], w_t, counted, o);
    }
    if (r == 0) {
      counts[2] = smoothing ? static_cast<double>(s.weights) : 0.0;
      if (o.reduction == Reduction::kNone) counts[0] = counts[1] = 0.0;
    }
  }
  if (o.reduction == Reduction::kNone) return;
  std::vector<LossTotals> per_thread(kCeReduceThreads), per_warp;
  for (int64_t i = 0; i < kCeReduceThreads; ++i) {
    for (int64_t r = i; r < rows; r += kCeReduceThreads) {
      per_thread[i] = add_totals(per_thread[i], scratch[r]);
    }
  }
  for (int64_t w = 0; w < kCeReduceThreads; w += 32) {
    const std::vector<LossTotals> warp(per_thread.begin() + w, per_thread.begin() + w + 32);
    per_warp.push_back(tree(warp, 0, warp.size(), add_totals));
  }
  LossTotals totals = per_warp[0];
  for (size_t w = 1; w < per_warp.size(); ++w) totals = add_totals(totals, per_warp[w]);
  loss[0] = static_cast<A>(totals.result(o));
  counts[0] = totals.weight;
  counts[1] = totals.counted;
}

// cross_entropy_loss_backward_kernel: each row's terms (RowTermsOfLoss), then the map.
template <typename A>
void ce_loss_backward_rows(const A* grad, int64_t grad_stride, const double* grad_lse,
                           const A* x, const int64_t* target, const A* weight, const double* lse,
                           const double* counts, int64_t rows, const CrossEntropyOptions& o,
                           A* dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target[r];
    const bool counted = row_counts(t, o);
    const int64_t c = target_in_range(t, o) ? readable_target(t, o) : 0;
    const double w_t = weight == nullptr ? 1.0 : static_cast<double>(weight[c]);
    const RowGradient g =
        row_gradient(static_cast<double>(grad[r * grad_stride]), counted, counts, o);
    const double g_lse = grad_lse == nullptr ? 0.0 : grad_lse[r];
    const RowTerms<A> k = row_terms<A>(g, g_lse, lse[r], w_t, counts[2], o);
    const int64_t one_hot_class = counted ? t : -1;
    for (int64_t j = 0; j < o.classes; ++j) {
      const A w = weight == nullptr ? A(1) : weight[j];
      A d = std::exp((x[r * o.classes + j] - k.hi) - k.lo) * k.coef - k.smooth * w;
      if (j == one_hot_class) d -= k.one_hot;
      dx[r * o.classes + j] = d;
    }
  }
}

// The masked backward (masked_backward_rows_kernel, masked_backward_long_kernel): per row,
// sum(g * y) (log_softmax: sum(g)) taken as the kernels' threads take it (each thread's
// elements in sequence, the threads' sums pairwise), then each value softmax y * (g - total)
// or log_softmax g - exp(y) * total through masked_gradient; 0 throughout a row whose lse is
// -inf.
template <typename A>
A backward_sum(const A* g, const A* y, int64_t begin, int64_t end, bool log) {
  if (end - begin <= kThreadElements) {
    A total = 0;
    for (int64_t j = begin; j < end; ++j) total += log ? g[j] : g[j] * y[j];
    return total;
  }
  int64_t threads = 1;
  while (threads * kThreadElements < end - begin) threads *= 2;
  const int64_t half = begin + threads / 2 * kThreadElements;
  return backward_sum(g, y, begin, half, log) + backward_sum(g, y, half, end, log);
}

template <typename A>
void masked_backward_rows(const A* g, const A* y, const double* lse, A scale, int64_t rows,
                          int64_t n, bool log, A* dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const A* gr = g + r * n;
    const A* yr = y + r * n;
    const bool live = stablekernels::masked_row_has_gradient(lse[r]);
    const A total = live ? backward_sum(gr, yr, 0, n, log) : A(0);
    for (int64_t j = 0; j < n; ++j) {
      const A d = log ? gr[j] - std::exp(yr[j]) * total : yr[j] * (gr[j] - total);
      dx[r * n + j] = live ? stablekernels::masked_gradient(d, yr[j], scale, log) : A(0);
    }
  }
}

CrossEntropyOptions ce_options(int64_t classes, int64_t ignore_index, double label_smoothing,
                               double z_loss, int reduction) {
  return {classes, ignore_index, label_smoothing, z_loss, static_cast<Reduction>(reduction)};
}

}  // namespace

extern "C" {

void sk_twin_masked_softmax_backward_f32(const float* g, const float* y, const double* lse,
                                         double scale, int64_t rows, int64_t n, int log,
                                         float* dx) {
  masked_backward_rows(g, y, lse, static_cast<float>(scale), rows, n, log != 0, dx);
}

void sk_twin_masked_softmax_backward_f64(const double* g, const double* y, const double* lse,
                                         double scale, int64_t rows, int64_t n, int log,
                                         double* dx) {
  masked_backward_rows(g, y, lse, scale, rows, n, log != 0, dx);
}

// keep (uint8) and add (the accumulation dtype) are per element of x, or null.
void sk_twin_masked_softmax_f32(const float* x, const unsigned char* keep, const float* add,
                                double scale, int64_t rows, int64_t n, int causal,
                                int64_t query_len, int64_t offset, int64_t capacity, int64_t tile,
                                int mode, float* y, double* lse) {
  masked_rows(x, keep, add, static_cast<float>(scale), rows, n, causal != 0, query_len, offset,
              capacity, tile, mode, y, lse);
}

void sk_twin_masked_softmax_f64(const double* x, const unsigned char* keep, const double* add,
                                double scale, int64_t rows, int64_t n, int causal,
                                int64_t query_len, int64_t offset, int64_t capacity, int64_t tile,
                                int mode, double* y, double* lse) {
  masked_rows(x, keep, add, scale, rows, n, causal != 0, query_len, offset, capacity, tile, mode, y,
              lse);
}

void sk_twin_softmax_f32(const float* x, float* y, int64_t rows, int64_t n, int64_t piece,
                         int log) {
  softmax_rows(x, y, rows, n, piece, log != 0);
}

void sk_twin_softmax_f64(const double* x, double* y, int64_t rows, int64_t n, int64_t piece,
                         int log) {
  softmax_rows(x, y, rows, n, piece, log != 0);
}

void sk_twin_logsumexp_f32(const float* x, double* out, int64_t rows, int64_t n, int64_t piece) {
  logsumexp_rows(x, out, rows, n, piece);
}

void sk_twin_logsumexp_f64(const double* x, double* out, int64_t rows, int64_t n, int64_t piece) {
  logsumexp_rows(x, out, rows, n, piece);
}


// The fused cross-entropy loss: x (rows, classes) contiguous, weight (classes) or null;
// reduction 0 "none", 1 "mean", 2 "sum" (cross_entropy_rows.h). counts as the CUDA kernels
// write it: counts[0], counts[1] 0 for "none", counts[2] 0 without label smoothing.
void sk_twin_cross_entropy_loss_f32(const float* x, const int64_t* target, const float* weight,
                                    int64_t rows, int64_t classes, int64_t ignore_index,
                                    double label_smoothing, double z_loss, int reduction,
                                    float* loss, double* lse, double* counts) {
  ce_loss_rows(x, target, weight, rows,
               ce_options(classes, ignore_index, label_smoothing, z_loss, reduction), loss, lse,
               counts);
}

void sk_twin_cross_entropy_loss_f64(const double* x, const int64_t* target, const double* weight,
                                    int64_t rows, int64_t classes, int64_t ignore_index,
                                    double label_smoothing, double z_loss, int reduction,
                                    double* loss, double* lse, double* counts) {
  ce_loss_rows(x, target, weight, rows,
               ce_options(classes, ignore_index, label_smoothing, z_loss, reduction), loss, lse,
               counts);
}

// Its backward: grad at grad_stride (0: one value for every row), grad_lse (rows) or null.
void sk_twin_cross_entropy_loss_backward_f32(const float* grad, int64_t grad_stride,
                                             const double* grad_lse, const float* x,
                                             const int64_t* target, const float* weight,
                                             const double* lse, const double* counts,
                                             int64_t rows, int64_t classes, int64_t ignore_index,
                                             double label_smoothing, double z_loss, int reduction,
                                             float* dx) {
  ce_loss_backward_rows(grad, grad_stride, grad_lse, x, target, weight, lse, counts, rows,
                        ce_options(classes, ignore_index, label_smoothing, z_loss, reduction), dx);
}

void sk_twin_cross_entropy_loss_backward_f64(const double* grad, int64_t grad_stride,
                                             const double* grad_lse, const double* x,
                                             const int64_t* target, const double* weight,
                                             const double* lse, const double* counts,
                                             int64_t rows, int64_t classes, int64_t ignore_index,
                                             double label_smoothing, double z_loss, int reduction,
                                             double* dx) {
  ce_loss_backward_rows(grad, grad_stride, grad_lse, x, target, weight, lse, counts, rows,
                        ce_options(classes, ignore_index, label_smoothing, z_loss, reduction), dx);
}

}  // extern "C"
