// logsumexp on the CPU: the forward for one dtype (the result, and the fp64 lse the backward
// reads) and the backward, a pure map from that lse.
// Part of kernels_impl.h, compiled once per CPU capability: it opens that file's namespace
// (one copy per capability) and is not compiled on its own.

#pragma once

#ifndef SK_CAPABILITY_NAMESPACE
#error "this header is part of kernels_impl.h: include that, with SK_CAPABILITY_NAMESPACE set"
#endif

#include <ATen/Parallel.h>
#include <ATen/ceil_div.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <stablekernels/online_softmax.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "load_store.h"
#include "row_stats.h"
#include "vec_math.h"

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

template <typename T>
void logsumexp_forward_typed(const T* x, T* out, double* lse, Layout L) {
  using acc_t = acc_of<T>;
  auto store = [&](int64_t row, State st) {
    const double value = finish_lse(st);
    lse[row] = value;
    out[row] = static_cast<T>(static_cast<acc_t>(value));  // halves: round once, from fp32
  };
  if (L.inner == 1) {
    run_rows<State>(
        L.outer, L.n,
        [&](int64_t r, int64_t b, int64_t e) {
          return segment_stats<T, acc_t>(x + r * L.x_stride + b, e - b);
        },
        merge_states,
        [&](int64_t r, int64_t b, int64_t, State st) {
          if (b == 0) store(r, st);
        });
    return;
  }
  run_columns(L, sizeof(T), [&](int64_t o, int64_t i0, int64_t width) {
    alignas(64) acc_t m[kMaxWidth];
    double s[kMaxWidth];
    column_stats<T, acc_t>(x + o * L.x_stride + i0, L.n, L.inner, width, m, s);
    for (int64_t i = 0; i < width; ++i) store(o * L.inner + i0 + i, State{m[i], s[i]});
  });
}

// dx = grad[r] * exp((x - hi[r]) - lo[r]): a pure map, split evenly over threads.
// dx = g[r] * exp((x - hi[r]) - lo[r]) with hi + lo = lse[r] (split_lse), g[r] the row's
// gradient (read as x's dtype at grad + r * grad_stride: 0 for one value for every row).
template <typename T>
void logsumexp_backward_typed(const T* grad, int64_t grad_stride, const double* lse, const T* x,
                              T* dx, Layout L) {
  using acc_t = acc_of<T>;
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  auto row_grad = [=](int64_t r) { return static_cast<acc_t>(grad[r * grad_stride]); };
  if (L.inner == 1) {
    const int64_t pieces = std::max<int64_t>(1, ceil_div(L.n, kSplitMin));
    const int64_t piece = ceil_div(L.n, pieces);
    const int64_t grain = std::max<int64_t>(1, kGrainElements / piece);
    const Store mode = store_for(L.outer * L.n * int64_t(sizeof(T)));
    at::parallel_for(0, L.outer * pieces, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / pieces, b = (t % pieces) * piece, e = std::min(L.n, b + piece);
        const LseSplit<acc_t> split = split_lse<acc_t>(lse[r]);
        const V g(row_grad(r)), vhi(split.hi), vlo(split.lo);
        const T* xr = x + r * L.x_stride + b;
        store_each<acc_t>(
            dx + r * L.n + b, e - b,
            [=](int64_t j, int64_t count) {
              return g * exp_nan_safe((io::load(xr + j, count) - vhi) - vlo);
            },
            mode);
      }
    });
    return;
  }
  run_columns(L, sizeof(T), [&](int64_t o, int64_t i0, int64_t width) {
    const int64_t row0 = o * L.inner + i0;
    const T* xb = x + o * L.x_stride + i0;
    T* db = dx + o * L.block() + i0;
    // The block's per-row values side by side, as the vector loads below read them.
    thread_local std::vector<acc_t> rows_g, rows_hi, rows_lo;
    rows_g.resize(width);
    rows_hi.resize(width);
    rows_lo.resize(width);
    for (int64_t i = 0; i < width; ++i) {
      const LseSplit<acc_t> split = split_lse<acc_t>(lse[row0 + i]);
      rows_g[i] = row_grad(row0 + i);
      rows_hi[i] = split.hi;
      rows_lo[i] = split.lo;
    }
    const acc_t *g = rows_g.data(), *h = rows_hi.data(), *l = rows_lo.data();
    for (int64_t j = 0; j < L.n; ++j) {
      const T* xj = xb + j * L.inner;
      store_each<acc_t>(db + j * L.inner, width, [=](int64_t i, int64_t c) {
        const V t = (io::load(xj + i, c) - V::loadu(h + i, c)) - V::loadu(l + i, c);
        return V::loadu(g + i, c) * exp_nan_safe(t);
      });
    }
  });
}

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
