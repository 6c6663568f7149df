// Vector arithmetic of the CPU kernels, on at::vec::Vectorized: the names every kernel header
// uses, the fp32 exp (exp_fp32) and the exp of either accumulation dtype (exp_of,
// exp_nan_safe), horizontal max and sum, and division by a reciprocal (divide).
// Part of kernels_impl.h, compiled once per CPU capability: it opens that file's namespace
// (one copy per capability) and is not compiled on its own.

#pragma once

#ifndef SK_CAPABILITY_NAMESPACE
#error "this header is part of kernels_impl.h: include that, with SK_CAPABILITY_NAMESPACE set"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

using at::vec::Vectorized;
using c10::BFloat16;
using c10::Half;

template <typename acc_t>
acc_t infinity() {
  return std::numeric_limits<acc_t>::infinity();
}

// exp of fp32 lanes t <= 88 (NaN and -inf give 0): t = n ln2 + r with n = round(t / ln2)
// (taken from the low bits of t log2(e) + 1.5 * 2^23) and ln2 split in two (Cody-Waite), so
// r in [-ln2/2, ln2/2] is exact to a few ulp of r at any n; e^r by a degree-5 polynomial
// (minimax for relative error, 1 exactly at r = 0, so exp(0) == 1); 2^n added to its
// exponent bits. Results below 2^-125 (t < -86.98) flush to 0, torch's exp_u20 flushing
// below 2^-126. 13 vector operations, 8 of them fused multiply-adds, no division, no call.
// Error: at most 2.5 ulp over every float t in [-104, 0] where exp(t) >= 2^-125 (1.98 with
// fused multiply-adds, 2.28 without: measured against double exp over all of them by
// csrc/tests/test_cpu_kernels.cpp, which fails above 2.5; docs/numerics.md).
constexpr float kExpFlushBelow = -86.98f;  // n = round(t log2 e) >= -125: 2^n p stays normal
inline Vectorized<float> exp_fp32(Vectorized<float> t) {
  using V = Vectorized<float>;
  using I = Vectorized<int32_t>;
  const V shifter(0x1.8p23f);
  const V k = at::vec::fmadd(t, V(0x1.715476p+0f), shifter);  // log2(e); n in k's low bits
  const V n = k - shifter;
  V r = at::vec::fmadd(n, V(-0x1.62e4p-1f), t);   // ln2's high part: n * it is exact
  r = at::vec::fmadd(n, V(-0x1.7f7d1cp-20f), r);  // ln2's low part
  V p = at::vec::fmadd(V(0x1.0fa7e6p-7f), r, V(0x1.573a98p-5f));
  p = at::vec::fmadd(p, r, V(0x1.555a6cp-3f));
  p = at::vec::fmadd(p, r, V(0x1.fffdc4p-2f));
  p = at::vec::fmadd(p, r, V(0x1.fffff6p-1f));
  p = at::vec::fmadd(p, r, V(1.0f));
  const I two_to_n = at::vec::cast<int32_t>(k) << I(23);  // k's bits: 0x4b400000 + n
  const V e = at::vec::cast<float>(at::vec::cast<int32_t>(p) + two_to_n);
  return e & (t >= V(kExpFlushBelow));
}

// exp of a vector whose lanes are never NaN: exp_fp32 for fp32 (it maps NaN to 0, hence
// exp_nan_safe where a NaN can arrive); Sleef's exp for fp64 (1 ulp, NaN-propagating).
template <typename acc_t>
Vectorized<acc_t> exp_of(Vectorized<acc_t> t) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_fp32(t);
  } else {
    return t.exp();
  }
}

template <typename acc_t>
Vectorized<acc_t> exp_nan_safe(Vectorized<acc_t> t) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return Vectorized<acc_t>::blendv(exp_fp32(t), t, t != t);
  } else {
    return t.exp();
  }
}

// Horizontal max (NaN-propagating) and sum (in double) of a vector: shuffle trees, not
// dependent chains of lane operations.
template <typename acc_t>
acc_t hmax(Vectorized<acc_t> v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t> a, Vectorized<acc_t> b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
double hsum(Vectorized<acc_t> v) {
  // A shuffle tree (log2 of the lanes deep), not a dependent chain of lane adds.
  return static_cast<double>(at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t> a, Vectorized<acc_t> b) { return a + b; }, v));
}

// a / b, as the correctly rounded quotient in all but rare cases (at most 1 ulp off), from
// r = 1/b: q = a * r, then one refinement q + (a - q * b) * r with fused multiply-adds (the
// remainder a - q * b is exact). Vector division costs 5 or more cycles per vector where
// these cost 1 or 2. neg_b is -b.
template <typename acc_t>
Vectorized<acc_t> divide(Vectorized<acc_t> a, Vectorized<acc_t> r, Vectorized<acc_t> neg_b) {
  const Vectorized<acc_t> q = a * r;
  return at::vec::fmadd(at::vec::fmadd(q, neg_b, a), r, q);
}

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
