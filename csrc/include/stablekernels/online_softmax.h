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

  // The state after one more element v (the sequential form of merge with (v, 0)), with one
  // exp: exp(-|v - m|) is the factor of whichever side is smaller.
  SK_HOST_DEVICE void update(acc_t v) {
    using std::fabs;
    const acc_t e = exp_of(-fabs(v - m));  // NaN for v NaN, or v == m == +-inf (not used)
    if (v > m) {
      s = (s + acc_t(1)) * e;
      m = v;
    } else if (v == m) {
      s += acc_t(1);
    } else {
      s += e;  // v < m, or v is NaN: s' becomes NaN
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

// ---------------------------------------------------------------------------------------
// The two-pass form, for a row (or a piece of one) whose max m is known before its exps: each
// element costs one exp, and no state moves to a new max. The elements below m add
// exp(x - m); those equal to m are counted instead (exactly 1 each, and the only way to get
// them right at m = +-inf). s' = below + (at_max - 1): the count, exact, goes in last so a
// tiny `below` keeps its digits. m is the max of the piece's elements as fmax takes it (NaN
// ignored); a NaN element then makes `below` NaN, whatever m is.

template <typename acc_t>
struct SumsAtMax {
  acc_t below;   // sum of exp(x - m) over the elements x != m
  acc_t at_max;  // the number of elements x == m

  static SK_HOST_DEVICE SumsAtMax empty() { return {acc_t(0), acc_t(0)}; }

  // Adds element v, of a piece whose max is m, and returns exp(v - m) (1 at the max, the
  // softmax numerator; meaningless for v == m == +-inf, whose rows softmax makes NaN).
  SK_HOST_DEVICE acc_t add(acc_t v, acc_t m) {
    const acc_t e = RowState<acc_t>::exp_of(v - m);
    const bool is_max = v == m;
    below += is_max ? acc_t(0) : e;
    at_max += is_max ? acc_t(1) : acc_t(0);
    return e;
  }

  SK_HOST_DEVICE SumsAtMax operator+(const SumsAtMax& o) const {
    return {below + o.below, at_max + o.at_max};
  }
};

// The state (m, s') of a piece of `count` elements from its max and sums. A piece whose max is
// -inf holds only -inf (and maybe NaN, which `below` carries): every element is a max, which
// `count` says exactly even where the kernel padded its registers with -inf. count 0 gives the
// empty state.
template <typename acc_t>
SK_HOST_DEVICE RowState<acc_t> state_at_max(acc_t m, SumsAtMax<acc_t> sums, acc_t count) {
  using std::isinf;
  using std::isnan;
  if (isinf(m) && m < 0 && !isnan(sums.below)) return {m, count - acc_t(1)};
  return {m, sums.below + (sums.at_max - acc_t(1))};
}

// torch's softmax and log_softmax are NaN on a whole row with a +inf, a NaN or nothing but
// -inf: wherever the max is not finite or s' is NaN.
template <typename acc_t>
SK_HOST_DEVICE bool row_is_nan(const RowState<acc_t>& st) {
  using std::isfinite;
  using std::isnan;
  return !isfinite(st.m) || isnan(st.s);
}

// 1 / d for d >= 1 (a softmax denominator 1 + s'), rounded to nearest. On a GPU in float:
// the hardware's approximate reciprocal and one Newton step (error below 0.5 ulp plus
// 2^-46 relative, so almost always the rounded quotient), instead of the IEEE division whose
// slow path for tiny or huge d is a call that spills the row held in registers.
template <typename acc_t>
SK_HOST_DEVICE acc_t reciprocal(acc_t d) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
    return fmaf(r, fmaf(-d, r, 1.0f), r);
  }
#endif
  return acc_t(1) / d;
}

// The factor of a softmax row, softmax_j = exp(x_j - m) * softmax_scale: 1 / (1 + s'), one
// reciprocal per row (then one rounded product per element: at most one unit of roundoff
// more than dividing each element), NaN on a NaN row.
template <typename acc_t>
SK_HOST_DEVICE acc_t softmax_scale(const RowState<acc_t>& st) {
  return row_is_nan(st) ? static_cast<acc_t>(NAN) : reciprocal(acc_t(1) + st.s);
}

// The term of a log_softmax row, log_softmax_j = (x_j - m) - log_softmax_shift: log1p(s'),
// NaN on a NaN row.
template <typename acc_t>
SK_HOST_DEVICE acc_t log_softmax_shift(const RowState<acc_t>& st) {
  using std::log1p;
  return row_is_nan(st) ? static_cast<acc_t>(NAN) : log1p(st.s);
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

// A float64 lse as hi + lo in acc_t: x - lse is then taken as (x - hi) - lo, where x - hi is
// exact for the entries near lse (those whose gradient is not negligible), so exp(x - lse)
// keeps its precision at any offset (a float lse near 1e6 is off by up to 0.03). lo is 0
// where lse is not finite. stablekernels/_numerics.py:split_lse is the same in torch.
template <typename acc_t>
struct LseSplit {
  acc_t hi, lo;
};

template <typename acc_t>
SK_HOST_DEVICE LseSplit<acc_t> split_lse(double lse) {
  using std::isfinite;
  const acc_t hi = static_cast<acc_t>(lse);
  return {hi, isfinite(lse) ? static_cast<acc_t>(lse - static_cast<double>(hi)) : acc_t(0)};
}

}  // namespace stablekernels
