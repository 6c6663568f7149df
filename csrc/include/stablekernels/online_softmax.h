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
// whose logsumexp is -inf as torch has it, and a row with +inf ends with m = +inf and a
// finite s' (logsumexp +inf; callers make softmax of such a row NaN, as torch does). A NaN
// anywhere makes s' NaN, so every result of the row is NaN. finish_lse below turns a final
// state into the logsumexp with these rules.
//
// Header-only, no torch: usable from C++ and CUDA (__host__ __device__ under nvcc).
#pragma once

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace stablekernels {

// The accumulation type of a kernel reading T and writing U: double if either is double, else
// float (halves are computed in float).
template <typename T, typename U = T>
using acc_of =
    std::conditional_t<std::is_same_v<T, double> || std::is_same_v<U, double>, double, float>;

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

// The logsumexp m + log1p(s') of a row's final state, in R (default acc_t): log1p is taken in
// acc_t and the sum in R, so finish_lse<double> of a float state keeps the float m exactly.
// The special rows, whatever s' holds there: NaN when s' is NaN (a NaN in the row); m when m
// is infinite (+inf for a row with a +inf, -inf for a row of -inf only or an empty one).
template <typename R = void, typename acc_t>
SK_HOST_DEVICE std::conditional_t<std::is_void_v<R>, acc_t, R> finish_lse(RowState<acc_t> st) {
  using out_t = std::conditional_t<std::is_void_v<R>, acc_t, R>;
  using std::isinf;
  using std::isnan;
  using std::log1p;
  if (isnan(st.s)) return static_cast<out_t>(NAN);
  if (isinf(st.m)) return static_cast<out_t>(st.m);
  return static_cast<out_t>(st.m) + static_cast<out_t>(log1p(st.s));
}

}  // namespace stablekernels
