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
#include <stablekernels/masked_rows.h>
#include <stablekernels/online_softmax.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using stablekernels::log_softmax_shift;
using stablekernels::merge;
using stablekernels::RowState;
using stablekernels::softmax_scale;
using stablekernels::state_at_max;
using stablekernels::SumsAtMax;

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

}  // extern "C"
