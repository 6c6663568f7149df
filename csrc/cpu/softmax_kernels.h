// softmax and log_softmax on the CPU: the row kernels (inner == 1, a row on one thread or
// split over threads), the strided write (inner > 1), the forward for one pair of dtypes,
// and the backward of both (BackwardRow).
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "load_store.h"
#include "row_stats.h"
#include "vec_math.h"

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

// ---------------------------------------------------------------------------------------
// Row kernels (inner == 1).

// softmax or log_softmax of a segment of a row from the row's state, exp computed here.
template <typename T, typename U>
void softmax_write(const T* x, U* y, int64_t len, State st, bool log, Store mode = Store::cached) {
  using acc_t = acc_of<T, U>;
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  if (row_is_nan(st)) {
    // torch: a row with a +inf (inf - inf), a NaN, or nothing but -inf is NaN throughout.
    store_nan<acc_t>(y, len, mode);
    return;
  }
  const V vm(static_cast<acc_t>(st.m));
  if (log) {
    const V log_sum(static_cast<acc_t>(std::log1p(st.s)));
    store_each<acc_t>(
        y, len, [=](int64_t j, int64_t count) { return (io::load(x + j, count) - vm) - log_sum; },
        mode);
  } else {
    const acc_t denominator = static_cast<acc_t>(1.0 + st.s);
    const V r(acc_t(1) / denominator), neg_den(-denominator);
    store_each<acc_t>(
        y, len,
        [=](int64_t j, int64_t count) {
          return divide(exp_of(io::load(x + j, count) - vm), r, neg_den);
        },
        mode);
  }
}

// y = e / ((1 + s') exp(m - m_c)) over a chunk whose exps e = exp(x - m_c) were stored by its
// statistics pass (m_c: the chunk's max; (m, s'): the row's state): the row's denominator
// seen from the chunk, in double, rounded once. A chunk of -inf only (no exps stored) is 0;
// a NaN row is NaN. e and y may be the same memory.
template <typename acc_t, typename U>
void write_scaled_chunk(const acc_t* e, U* y, int64_t len, State st, acc_t m_c,
                        Store mode = Store::cached) {
  using V = Vectorized<acc_t>;
  if (row_is_nan(st)) {
    store_nan<acc_t>(y, len, mode);
    return;
  }
  if (m_c == -infinity<acc_t>()) {
    fill_row<acc_t>(y, len, acc_t(0), mode);
    return;
  }
  const double gap = st.m - static_cast<double>(m_c);
  const acc_t denominator = static_cast<acc_t>((1.0 + st.s) * (gap == 0 ? 1.0 : std::exp(gap)));
  const V r(acc_t(1) / denominator), neg_den(-denominator);
  store_each<acc_t>(
      y, len, [=](int64_t j, int64_t count) { return divide(V::loadu(e + j, count), r, neg_den); },
      mode);
}

// Rows up to this many elements keep their exps for the write pass (in a per-thread buffer,
// 4 MiB of fp32 at most, when y is not of the accumulation dtype or is streamed); longer
// ones compute them again (or keep them in y itself).
constexpr int64_t kKeepExpsMax = int64_t(1) << 20;

// softmax or log_softmax of a whole row, on one thread. softmax keeps the exps of the
// statistics pass with each chunk's max, then scales them: one exp per element, x read
// once. The exps go to y itself when y has the accumulation dtype and is cached, else to a
// per-thread buffer (a streamed y is written once, by the scaling pass).
template <typename T, typename U>
State softmax_row(const T* x, U* y, int64_t n, bool log, Store mode) {
  using acc_t = acc_of<T, U>;
  constexpr bool kSameType = std::is_same_v<U, acc_t>;
  if (log || (!kSameType && n > kKeepExpsMax)) {
    const State st = segment_stats<T, acc_t>(x, n);
    softmax_write(x, y, n, st, log, mode);
    return st;
  }
  acc_t* e;
  if (kSameType && (mode == Store::cached || n > kKeepExpsMax)) {
    e = reinterpret_cast<acc_t*>(y);
    mode = Store::cached;
  } else {
    thread_local std::vector<acc_t> buffer;
    if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    e = buffer.data();
  }
  if (n <= kChunk) {
    const State st = chunk_stats<T, acc_t>(x, n, e);
    write_scaled_chunk(e, y, n, st, static_cast<acc_t>(st.m), mode);
    return st;
  }
  thread_local std::vector<acc_t> maxima;
  maxima.resize(ceil_div(n, kChunk));
  State st = State::empty();
  for (int64_t c0 = 0, k = 0; c0 < n; c0 += kChunk, ++k) {
    const State c = chunk_stats<T, acc_t>(x + c0, std::min(kChunk, n - c0), e + c0);
    maxima[k] = static_cast<acc_t>(c.m);
    st = merge(st, c);
  }
  for (int64_t c0 = 0, k = 0; c0 < n; c0 += kChunk, ++k)
    write_scaled_chunk(e + c0, y + c0, std::min(kChunk, n - c0), st, maxima[k], mode);
  return st;
}

// softmax of rows split into segments (split_rows), into y of the accumulation dtype: the
// statistics pass stores exp(x - m_c) into y and records each chunk's max m_c; the write
// pass scales each chunk (write_scaled_chunk). One exp per element, and x is read once.
template <typename T, typename acc_t>
void softmax_split_rows(const T* x, acc_t* y, const Layout& L) {
  const int64_t chunks = ceil_div(L.n, kChunk);
  std::vector<acc_t> chunk_maxima(L.outer * chunks);
  run_rows<State>(
      L.outer, L.n,
      [&](int64_t r, int64_t b, int64_t e) {
        State total = State::empty();
        for (int64_t c0 = b; c0 < e; c0 += kChunk) {
          const State st = chunk_stats<T, acc_t>(x + r * L.x_stride + c0, std::min(kChunk, e - c0),
                                                 y + r * L.n + c0);
          chunk_maxima[r * chunks + c0 / kChunk] = static_cast<acc_t>(st.m);
          total = merge(total, st);
        }
        return total;
      },
      merge_states,
      [&](int64_t r, int64_t b, int64_t e, State st) {
        acc_t* row = y + r * L.n;
        for (int64_t c0 = b; c0 < e; c0 += kChunk) {
          write_scaled_chunk(row + c0, row + c0, std::min(kChunk, e - c0), st,
                             chunk_maxima[r * chunks + c0 / kChunk]);
        }
      });
}

// ---------------------------------------------------------------------------------------
// Strided kernels (inner > 1), on the tiles of run_columns (row_stats.h).

// softmax / log_softmax of `width` strided rows, given their statistics.
template <typename T, typename U, typename acc_t>
void column_softmax_write(const T* x, U* y, int64_t n, int64_t stride, int64_t width,
                          const acc_t* m, const double* s, bool log) {
  using V = Vectorized<acc_t>;
  // c: the denominator 1 + s', or log1p(s'). poison: 0, or NaN for rows with a +inf, a NaN
  // or nothing but -inf (torch makes those NaN throughout); added to every result.
  alignas(64) acc_t c[kMaxWidth], rcp[kMaxWidth], neg_c[kMaxWidth], poison[kMaxWidth];
  for (int64_t i = 0; i < width; ++i) {
    c[i] = static_cast<acc_t>(log ? std::log1p(s[i]) : 1.0 + s[i]);
    rcp[i] = acc_t(1) / c[i];
    neg_c[i] = -c[i];
    poison[i] = std::isfinite(m[i]) ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* xj = x + j * stride;
    store_each<acc_t>(y + j * stride, width, [&](int64_t i, int64_t k) {
      const V t = IO<T, acc_t>::load(xj + i, k) - V::loadu(m + i, k);
      const V r = log ? t - V::loadu(c + i, k)
                      : divide(exp_of(t), V::loadu(rcp + i, k), V::loadu(neg_c + i, k));
      return r + V::loadu(poison + i, k);
    });
  }
}

// ---------------------------------------------------------------------------------------
// The kernels, for one pair of dtypes.

template <typename T, typename U>
void softmax_forward_typed(const T* x, U* y, Layout L, bool log) {
  using acc_t = acc_of<T, U>;
  const Store mode = store_for(L.outer * L.block() * int64_t(sizeof(U)));
  if (L.inner == 1 && !split_rows(L.outer, L.n)) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / L.n);
    at::parallel_for(0, L.outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        softmax_row(x + r * L.x_stride, y + r * L.n, L.n, log, mode);
    });
    return;
  }
  if constexpr (std::is_same_v<U, acc_t>) {
    if (L.inner == 1 && !log) {
      softmax_split_rows(x, y, L);
      return;
    }
  }
  if (L.inner == 1) {  // log_softmax, or an output in another dtype: exp again on writing
    run_rows<State>(
        L.outer, L.n,
        [&](int64_t r, int64_t b, int64_t e) {
          return segment_stats<T, acc_t>(x + r * L.x_stride + b, e - b);
        },
        merge_states,
        [&](int64_t r, int64_t b, int64_t e, State st) {
          softmax_write(x + r * L.x_stride + b, y + r * L.n + b, e - b, st, log, mode);
        });
    return;
  }
  run_columns(L, sizeof(T), [&](int64_t o, int64_t i0, int64_t width) {
    const T* xb = x + o * L.x_stride + i0;
    alignas(64) acc_t m[kMaxWidth];
    double s[kMaxWidth];
    column_stats<T, acc_t>(xb, L.n, L.inner, width, m, s);
    column_softmax_write(xb, y + o * L.block() + i0, L.n, L.inner, width, m, s, log);
  });
}

// The backward of softmax (kLog false) and log_softmax (kLog true), per row:
//   softmax:     dot = sum(grad * y),  dx = y * (grad - dot)
//   log_softmax: dot = sum(grad),      dx = grad - exp(y) * dot
// On a contiguous segment: full vectors, then one partial vector (its lanes past the end
// load as 0, so they add nothing to dot). dot is summed in fp32 blocks of kBlock vectors, in
// four independent chains, added into a double (compensated for double inputs: BlockTotal).
template <bool kLog, typename T, typename acc_t>
struct BackwardRow {
  using V = Vectorized<acc_t>;
  using io = IO<T, acc_t>;
  static constexpr int64_t kVec = V::size();

  static V term(V g, V y) {
    if constexpr (kLog) {
      return g;
    } else {
      return g * y;
    }
  }
  static V result(V g, V y, V dot) {
    if constexpr (kLog) {
      return at::vec::fnmadd(exp_nan_safe(y), dot, g);  // one rounding, as written
    } else {
      return y * (g - dot);
    }
  }
  static V term_at(const T* g, const T* y, int64_t j) {
    return term(io::load(g + j), io::load(y + j));
  }

  static double dot(const T* g, const T* y, int64_t len) {
    const int64_t full = len - len % kVec;
    BlockTotal<acc_t> total;
    for (int64_t b = 0; b < full; b += kBlock * kVec) {
      const int64_t end = std::min(full, b + kBlock * kVec);
      V a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
      int64_t j = b;
      for (; j + 4 * kVec <= end; j += 4 * kVec) {
        a0 += term_at(g, y, j);
        a1 += term_at(g, y, j + kVec);
        a2 += term_at(g, y, j + 2 * kVec);
        a3 += term_at(g, y, j + 3 * kVec);
      }
      for (; j < end; j += kVec) a0 += term_at(g, y, j);
      total.add(hsum((a0 + a1) + (a2 + a3)));
    }
    if (full < len) {
      total.add(hsum(term(io::load(g + full, len - full), io::load(y + full, len - full))));
    }
    return total.value();
  }

  template <typename U>
  static void write(const T* g, const T* y, U* dx, int64_t len, acc_t dot, Store mode) {
    const V vd(dot);
    store_each<acc_t>(
        dx, len,
        [=](int64_t j, int64_t count) {
          return result(io::load(g + j, count), io::load(y + j, count), vd);
        },
        mode);
  }
};

// grad, y and dx are contiguous here (L.x_stride == L.block()).
template <bool kLog, typename T, typename U>
void softmax_backward_impl(const T* grad, const T* y, U* dx, const Layout& L) {
  using acc_t = acc_of<T, U>;
  using io = IO<T, acc_t>;
  using row = BackwardRow<kLog, T, acc_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const int64_t n = L.n;
  if (L.inner == 1) {
    run_rows<double>(
        L.outer, n,
        [grad, y, n](int64_t r, int64_t b, int64_t e) {
          return row::dot(grad + r * n + b, y + r * n + b, e - b);
        },
        add_doubles,
        [grad, y, dx, n, mode = store_for(L.outer * n * int64_t(sizeof(U)))](
            int64_t r, int64_t b, int64_t e, double dot) {
          row::write(grad + r * n + b, y + r * n + b, dx + r * n + b, e - b,
                     static_cast<acc_t>(dot), mode);
        });
    return;
  }
  run_columns(L, 2 * sizeof(T), [&](int64_t o, int64_t i0, int64_t width) {
    const int64_t base = o * L.block() + i0;
    alignas(64) acc_t block[kMaxWidth], totals[kMaxWidth];
    double sums[kMaxWidth] = {};
    for (int64_t j0 = 0; j0 < L.n; j0 += kBlock) {
      std::fill(block, block + width, acc_t(0));
      for (int64_t j = j0; j < std::min(L.n, j0 + kBlock); ++j) {
        const int64_t at = base + j * L.inner;
        for (int64_t i = 0; i < width; i += kVec) {
          const int64_t c = std::min(kVec, width - i);
          (V::loadu(block + i, c) + row::term(io::load(grad + at + i, c), io::load(y + at + i, c)))
              .store(block + i, c);
        }
      }
      for (int64_t i = 0; i < width; ++i) sums[i] += block[i];
    }
    for (int64_t i = 0; i < width; ++i) totals[i] = static_cast<acc_t>(sums[i]);
    for (int64_t j = 0; j < L.n; ++j) {
      const int64_t at = base + j * L.inner;
      for (int64_t i = 0; i < width; i += kVec) {
        const int64_t c = std::min(kVec, width - i);
        IO<U, acc_t>::store(dx + at + i,
                            row::result(io::load(grad + at + i, c), io::load(y + at + i, c),
                                        V::loadu(totals + i, c)),
                            c);
      }
    }
  });
}

template <typename T, typename U>
void softmax_backward_typed(const T* grad, const T* y, U* dx, Layout L, bool log) {
  if (log) {
    softmax_backward_impl<true>(grad, y, dx, L);
  } else {
    softmax_backward_impl<false>(grad, y, dx, L);
  }
}

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
