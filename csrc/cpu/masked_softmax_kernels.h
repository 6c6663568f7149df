// Masked softmax (attention) on the CPU: each row's scaled and masked terms, then the row
// kernels of softmax_kernels.h.
// Part of kernels_impl.h, compiled once per CPU capability: it opens that file's namespace
// (one copy per capability) and is not compiled on its own.

#pragma once

#ifndef SK_CAPABILITY_NAMESPACE
#error "this header is part of kernels_impl.h: include that, with SK_CAPABILITY_NAMESPACE set"
#endif

#include <ATen/Parallel.h>
#include <stablekernels/masked_rows.h>
#include <stablekernels/online_softmax.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "load_store.h"
#include "row_stats.h"
#include "softmax_kernels.h"

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

// ---------------------------------------------------------------------------------------
// Masked softmax (attention): each row's t = scale * x + mask is formed in a per-thread
// buffer of the accumulation dtype (x and the mask read once, the mask by its strides), then
// taken by the row kernels above as a row of acc_t: one read of x, one write of y. A causal
// row forms and exponentiates only its first `limit` elements; the rest is written as 0
// (-inf for log_softmax).

// t[j] = scale * x[j] (+ mask[j * ms] if additive; -inf where a bool mask is false), j < len.
template <typename T, typename M, typename acc_t>
void masked_terms(const T* __restrict__ x, const M* __restrict__ mask, int64_t ms, acc_t scale,
                  acc_t* __restrict__ t, int64_t len) {
  constexpr acc_t kDropped = -std::numeric_limits<acc_t>::infinity();
  if (mask == nullptr) {
    for (int64_t j = 0; j < len; ++j) t[j] = scale * static_cast<acc_t>(x[j]);
  } else if constexpr (std::is_same_v<M, bool>) {
    if (ms == 1) {
      for (int64_t j = 0; j < len; ++j)
        t[j] = mask[j] ? scale * static_cast<acc_t>(x[j]) : kDropped;
    } else {
      for (int64_t j = 0; j < len; ++j)
        t[j] = mask[j * ms] ? scale * static_cast<acc_t>(x[j]) : kDropped;
    }
  } else if (ms == 1) {
    for (int64_t j = 0; j < len; ++j) t[j] = scale * static_cast<acc_t>(x[j]) + mask[j];
  } else {
    for (int64_t j = 0; j < len; ++j) t[j] = scale * static_cast<acc_t>(x[j]) + mask[j * ms];
  }
}

// y by `mode`: softmax or log_softmax (rows x n), the logsumexp (rows; a dead row by
// `masked_rows`), nothing (statistics); a dead row's y is dead_row_value (masked_rows.h).
template <typename T, typename U, typename M>
void masked_softmax_typed(const T* x, U* y, int64_t rows, int64_t n, const RowMask& mask,
                          double scale, bool causal, int64_t query_len, int64_t causal_offset,
                          MaskedMode mode, MaskedRows masked_rows, double* lse) {
  using acc_t = acc_of<T, U>;
  const acc_t s = static_cast<acc_t>(scale);
  const M* mask_data = static_cast<const M*>(mask.data);
  const bool log = mode == MaskedMode::kLogSoftmax;
  const bool rows_out = writes_rows(mode);
  const Store store = store_for(rows_out ? rows * n * int64_t(sizeof(U)) : 0);
  const acc_t dropped = log ? -infinity<acc_t>() : acc_t(0);
  const acc_t dead_value = dead_row_value<acc_t>(log, masked_rows);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<acc_t> terms;
    if (static_cast<int64_t>(terms.size()) < n) terms.resize(n);
    acc_t* t = terms.data();
    for (int64_t r = begin; r < end; ++r) {
      int64_t limit = n;
      if (causal) limit = std::clamp<int64_t>(r % query_len + causal_offset + 1, 0, n);
      const M* m = mask_data == nullptr ? nullptr : mask_data + mask.offset(r);
      masked_terms<T, M, acc_t>(x + r * n, m, mask.col_stride, s, t, limit);
      U* yr = rows_out ? y + r * n : nullptr;
      State st = State::empty();
      if (limit > 0) {
        st = rows_out ? softmax_row<acc_t, U>(t, yr, limit, log, store)
                      : segment_stats<acc_t, acc_t>(t, limit);
      }
      // Nothing kept (every t_j = -inf): 0 / -inf (or NaN) throughout, lse -inf (not torch's
      // NaN).
      const bool dead = st.m == -std::numeric_limits<double>::infinity() && !std::isnan(st.s);
      lse[r] = dead ? st.m : finish_lse<double>(st);
      if (mode == MaskedMode::kLogsumexp) {  // halves: round once, from acc_t (as logsumexp)
        y[r] = static_cast<U>(static_cast<acc_t>(masked_logsumexp(lse[r], masked_rows)));
      }
      if (!rows_out) continue;
      if (dead) {
        fill_row<acc_t>(yr, n, dead_value, store);
      } else if (limit < n) {
        if (row_is_nan(st)) {
          store_nan<acc_t>(yr + limit, n - limit, store);
        } else {
          fill_row<acc_t>(yr + limit, n - limit, dropped, store);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// The masked backward: per row, the plain backward of softmax_kernels.h (BackwardRow: its
// dot and its values, the same arithmetic), then the rule of masked_rows.h on each value
// (scale; 0 at a dropped element of log_softmax); a row whose lse is -inf is written as 0
// without a read. grad, y and dx are contiguous (rows, n).
template <bool kLog, typename T, typename U>
void masked_softmax_backward_impl(const T* grad, const T* y, const double* lse, U* dx,
                                  int64_t rows, int64_t n, double scale) {
  using acc_t = acc_of<T, U>;
  using io = IO<T, acc_t>;
  using row = BackwardRow<kLog, T, acc_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const acc_t s = static_cast<acc_t>(scale);
  run_rows<double>(
      rows, n,
      [grad, y, lse, n](int64_t r, int64_t b, int64_t e) {
        return masked_row_has_gradient(lse[r]) ? row::dot(grad + r * n + b, y + r * n + b, e - b)
                                               : 0.0;
      },
      add_doubles,
      [grad, y, lse, dx, n, s, mode = store_for(rows * n * int64_t(sizeof(U)))](
          int64_t r, int64_t b, int64_t e, double dot) {
        U* out = dx + r * n + b;
        if (!masked_row_has_gradient(lse[r])) {
          fill_row<acc_t>(out, e - b, acc_t(0), mode);
          return;
        }
        const T* g = grad + r * n + b;
        const T* yr = y + r * n + b;
        const V vd(static_cast<acc_t>(dot));
        store_each<acc_t>(
            out, e - b,
            [=](int64_t j, int64_t count) {
              const V yv = io::load(yr + j, count);
              alignas(64) acc_t d[kVec], ys[kVec];
              row::result(io::load(g + j, count), yv, vd).store(d);
              yv.store(ys);
              for (int64_t i = 0; i < kVec; ++i) d[i] = masked_gradient(d[i], ys[i], s, kLog);
              return V::loadu(d);
            },
            mode);
      });
}

template <typename T, typename U>
void masked_softmax_backward_typed(const T* grad, const T* y, const double* lse, U* dx,
                                   int64_t rows, int64_t n, double scale, bool log) {
  if (log) {
    masked_softmax_backward_impl<true>(grad, y, lse, dx, rows, n, scale);
  } else {
    masked_softmax_backward_impl<false>(grad, y, lse, dx, rows, n, scale);
  }
}

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
