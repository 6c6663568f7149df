// The online (m, s') state of a row and its merge rule: the numerics contract of
// stablekernels in one place, shared by the CPU and CUDA kernels.
//
// Blanchard, Higham & Higham 2021, Alg. 4.1, for a row x:
//
//     m  = max(x)                        (one argmax position k)
//     s' = sum_{i != k} exp(x_i - m)     (the max term, exactly 1, left out)
//     logsumexp   = m + log1p(s')
//     softmax_j   = exp(x_j - m) / (1 + s')
//     log_softmax = (x_j - m) - log1p(s')
//
// A state (m, s') stands for the sum (1 + s') * exp(m) of the exps seen so far. The empty
// state is (m = -inf, s' = -1): the sum 0. Two states merge, with m1 >= m2, as
//
//     (m1, s1) + (m2, s2) = (m1, s1 + (s2 + 1) * exp(m2 - m1))
//
// and equal maxima merge exactly: (m, s1 + s2 + 1). Equal maxima include -inf == -inf and
// +inf == +inf, where exp(m2 - m1) would be NaN: so an all -inf row ends as (-inf, n - 1),
// whose logsumexp -inf + log1p(n - 1) is -inf as torch has it, and a row with +inf ends with
// m = +inf and a finite s' (logsumexp +inf; callers make softmax of such a row NaN, as
// torch does). A NaN anywhere makes s' NaN, so every result of the row is NaN. m is never
// NaN.
//
// Header-only, no torch: usable from C++ and CUDA (__host__ __device__ under nvcc).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace stablekernels {

template <typename acc_t>
struct RowState {
  acc_t m;  // the max so far
  acc_t s;  // s': sum of exp(x_i - m) over the elements seen, one max term left out

  static SK_HOST_DEVICE RowState empty() { return {-static_cast<acc_t>(INFINITY), acc_t(-1)}; }

  // The state after one more element v (the sequential form of merge with (v, 0)).
  SK_HOST_DEVICE void update(acc_t v) {
    if (v > m) {
      s = (s + acc_t(1)) * exp_of(m - v);
      m = v;
    } else if (v == m) {
      s += acc_t(1);
    } else {
      s += exp_of(v - m);  // v < m, or v is NaN: s' becomes NaN
    }
  }

  static SK_HOST_DEVICE acc_t exp_of(acc_t t) {
    using std::exp;
    return exp(t);
  }

  SK_HOST_DEVICE acc_t logsumexp() const {
    using std::log1p;
    return m + log1p(s);
  }
};

// (m1, s1) + (m2, s2); see the file comment.
template <typename acc_t>
SK_HOST_DEVICE RowState<acc_t> merge(RowState<acc_t> a, RowState<acc_t> b) {
  if (a.m < b.m) {
    RowState<acc_t> t = a;
    a = b;
    b = t;
  }
  if (a.m == b.m) {
    return {a.m, a.s + b.s + acc_t(1)};
  }
  return {a.m, a.s + (b.s + acc_t(1)) * RowState<acc_t>::exp_of(b.m - a.m)};
}

}  // namespace stablekernels
