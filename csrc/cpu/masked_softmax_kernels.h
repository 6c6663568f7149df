// Masked softmax (attention) on the CPU: each row's scaled and masked terms, then the row
// kernels of softmax_kernels.h.
// Part of kernels_impl.h, compiled once per CPU capability: it opens that file's namespace
// (one copy per capability) and is not compiled on its own.

#pragma once

#ifndef SK_CAPABILITY_NAMESPACE
#error "this header is part of kernels_impl.h: include that, with SK_CAPABILITY_NAMESPACE set"
#endif

#include <ATen/Parallel.h>
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

template <typename T, typename U, typename M>
void masked_softmax_typed(const T* x, U* y, int64_t rows, int64_t n, const RowMask& mask,
                          double scale, bool causal, int64_t query_len, int64_t causal_offset,
                          int mode, double* lse) {
  using acc_t = acc_of<T, U>;
  const acc_t s = static_cast<acc_t>(scale);
  const M* mask_data = static_cast<const M*>(mask.data);
  const bool log = mode == 1;
  const Store store = store_for(mode == 2 ? 0 : rows * n * int64_t(sizeof(U)));
  const acc_t dropped = log ? -infinity<acc_t>() : acc_t(0);
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
      U* yr = mode == 2 ? nullptr : y + r * n;
      State st = State::empty();
      if (limit > 0) {
        st = mode == 2 ? segment_stats<acc_t, acc_t>(t, limit)
                       : softmax_row<acc_t, U>(t, yr, limit, log, store);
      }
      // Nothing kept (every t_j = -inf): 0 / -inf throughout, lse -inf (not torch's NaN).
      const bool dead = st.m == -std::numeric_limits<double>::infinity() && !std::isnan(st.s);
      lse[r] = dead ? st.m : finish_lse<double>(st);
      if (mode == 2) continue;
      if (dead) {
        fill_row<acc_t>(yr, n, dropped, store);
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

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
