// A host twin of the CUDA row kernels' arithmetic (csrc/cuda/softmax.cu), compiled by
// tests/test_cuda_twin.py into a small shared library and checked against the float64
// reference with the accuracy tests' bounds. It runs the same header code as the kernels
// (stablekernels/online_softmax.h): the max of a piece first, one exp per element against it
// (SumsAtMax), the piece's state (state_at_max), pieces merged by the merge rule (the split
// path), and outputs exp(x - m) * softmax_scale or (x - m) - log_softmax_shift. What differs
// on the GPU: the order of the sums (a tree over threads), exp (CUDA's expf, within 2 ulp),
// and the float reciprocal (rcp.approx and a Newton step, within 1 ulp of the rounded one).
#include <stablekernels/online_softmax.h>

#include <cmath>
#include <cstdint>

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

}  // namespace

extern "C" {

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
