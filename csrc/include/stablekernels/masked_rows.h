// The masked softmax's options and its backward rule, shared by the CPU and CUDA kernels
// (docs/masked_softmax.md). The enums are the Python ones of stablekernels/_masked.py
// (MaskedMode, MaskedRows), passed to the extension's ops as ints: the values must match.
//
// Header-only, no torch: usable from C++ and CUDA (__host__ __device__ under nvcc).
#pragma once

#include <stablekernels/online_softmax.h>

#include <cmath>
#include <cstdint>

namespace stablekernels {

// What the masked forward computes of t = scale * x + mask, row by row.
enum class MaskedMode : int {
  kSoftmax = 0,     // y = softmax(t), x's shape
  kLogSoftmax = 1,  // y = log_softmax(t), x's shape
  kStatistics = 2,  // the fp64 lse only (y unused)
  kLogsumexp = 3,   // y[r] = the lse of row r, in y's dtype (a dead row by MaskedRows)
};

// What a row with nothing kept ("dead": every t_j = -inf) gives; its fp64 lse is -inf either
// way, and its gradient 0. The public argument `masked_rows` ("zero" / "nan").
enum class MaskedRows : int {
  kZero = 0,  // softmax 0, log_softmax -inf, logsumexp -inf
  kNan = 1,   // NaN throughout
};

inline bool valid_masked_mode(int64_t mode) { return mode >= 0 && mode <= 3; }
inline bool valid_masked_rows(int64_t rows) { return rows == 0 || rows == 1; }

// Whether mode writes an x-shaped y (softmax, log_softmax).
SK_HOST_DEVICE bool writes_rows(MaskedMode mode) {
  return mode == MaskedMode::kSoftmax || mode == MaskedMode::kLogSoftmax;
}

// The output of a dead row for `log` (log_softmax or logsumexp: -inf; softmax: 0), or NaN.
template <typename A>
SK_HOST_DEVICE A dead_row_value(bool log, MaskedRows rows) {
  if (rows == MaskedRows::kNan) return static_cast<A>(NAN);
  return log ? -static_cast<A>(INFINITY) : A(0);
}

// The logsumexp output of a row from its fp64 lse: NaN on a dead row (lse -inf) for kNan.
SK_HOST_DEVICE double masked_logsumexp(double lse, MaskedRows rows) {
  return rows == MaskedRows::kNan && lse == -static_cast<double>(INFINITY)
             ? static_cast<double>(NAN)
             : lse;
}

// ---------------------------------------------------------------------------------------
// The backward rule. Per row, from the forward's fp64 lse: a dead row (lse -inf) has the
// gradient 0. Else each element's plain backward d (softmax: y * (g - sum(g * y));
// log_softmax: g - exp(y) * sum(g)), computed in the accumulation dtype A, is scaled by
// `scale` (dt/dx), and for log_softmax a dropped element (y = -inf, where the plain backward
// leaves g) has 0.

SK_HOST_DEVICE bool masked_row_has_gradient(double lse) {
  return !(lse == -static_cast<double>(INFINITY));
}

template <typename A>
SK_HOST_DEVICE A masked_gradient(A d, A y, A scale, bool log) {
  return log && y == -static_cast<A>(INFINITY) ? A(0) : scale * d;
}

}  // namespace stablekernels
