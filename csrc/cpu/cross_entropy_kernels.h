// Cross-entropy on the CPU, class targets: the rows' pieces (nll, smoothing term, lse), the
// forward, the loss with its reduction and target counts, and the backward maps.
// Part of kernels_impl.h, compiled once per CPU capability: it opens that file's namespace
// (one copy per capability) and is not compiled on its own.

#pragma once

#ifndef SK_CAPABILITY_NAMESPACE
#error "this header is part of kernels_impl.h: include that, with SK_CAPABILITY_NAMESPACE set"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>
#include <stablekernels/cross_entropy_rows.h>
#include <stablekernels/online_softmax.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels.h"
#include "load_store.h"
#include "row_stats.h"
#include "vec_math.h"

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

// ---------------------------------------------------------------------------------------
// Cross-entropy statistics of contiguous rows (row r at x + r * x_stride, C classes), class
// targets: per row nll = (m - x_t) + log1p(s'), and for label smoothing
// sum_c w_c (m - x_c) + W log1p(s') (w: class weights, all 1 without; W their sum), whose
// terms are all >= 0. sum_c w_c (m - x_c) is summed per chunk against the chunk's max and
// moved to the row's max as a_c + (m - m_c) W_c: no cancellation. The caller combines them
// into the loss.

// sum over a chunk of w_c (m - x_c), and of w_c (the count without weights).
template <typename T, typename acc_t>
std::pair<double, double> chunk_gaps(const T* p, int64_t len, acc_t m, const acc_t* w) {
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const V vm(m);
  BlockSum<acc_t> gaps, weights;
  for (int64_t j = 0; j < len; j += kVec) {
    const int64_t count = std::min(kVec, len - j);
    // A -inf logit's gap is +inf, as torch's smooth term, also in a chunk whose max is -inf
    // (where m - x would be -inf - -inf = NaN).
    const V x = io::load(p + j, count);
    const V d = V::blendv(vm - x, V(infinity<acc_t>()), x == V(-infinity<acc_t>()));
    if (w != nullptr) {
      const V wv = V::loadu(w + j, count);  // lanes past count load 0
      gaps.add(V::set(V(acc_t(0)), d * wv, count));
      weights.add(wv);
    } else {
      gaps.add(V::set(V(acc_t(0)), d, count));
    }
  }
  return {gaps.result(), w != nullptr ? weights.result() : static_cast<double>(len)};
}

// A class target in [0, classes), or IndexError in torch's words (the router checks first;
// this keeps a direct call of the kernel op from reading or writing outside a row).
inline void check_target(int64_t t, int64_t classes) {
  TORCH_CHECK_INDEX(t >= 0 && t < classes, "Target ", t, " is out of bounds.");
}

// The pieces of rows [0, rows), each handed to emit(r, nll, smooth, lse) (fp64; smooth 0
// without `smoothing`), rows in parallel. class_of(r) is the class whose logit row r reads,
// in [0, classes) (the callers check it).
template <typename T, typename ClassOf, typename Emit>
void cross_entropy_rows(const T* x, int64_t x_stride, ClassOf class_of, const acc_of<T>* weight,
                        int64_t rows, int64_t classes, bool smoothing, Emit emit) {
  using acc_t = acc_of<T>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / classes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> chunk_m, chunk_a, chunk_w;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      State st = State::empty();
      chunk_m.clear();
      chunk_a.clear();
      chunk_w.clear();
      for (int64_t c0 = 0; c0 < classes; c0 += kChunk) {
        const int64_t len = std::min(kChunk, classes - c0);
        const State c = chunk_stats<T, acc_t>(xr + c0, len);
        st = merge(st, c);
        if (smoothing) {
          const auto [a, wsum] = chunk_gaps<T, acc_t>(xr + c0, len, static_cast<acc_t>(c.m),
                                                      weight == nullptr ? nullptr : weight + c0);
          chunk_m.push_back(c.m);
          chunk_a.push_back(a);
          chunk_w.push_back(wsum);
        }
      }
      const double log_rest = std::log1p(st.s);
      const double nll = (st.m - static_cast<double>(static_cast<acc_t>(xr[class_of(r)]))) + log_rest;
      double gaps = 0, total_w = 0;
      for (size_t k = 0; k < chunk_m.size(); ++k) {
        gaps += chunk_a[k] +
                (chunk_w[k] > 0 && st.m != chunk_m[k] ? (st.m - chunk_m[k]) * chunk_w[k] : 0.0);
        total_w += chunk_w[k];
      }
      emit(r, nll, smoothing ? gaps + total_w * log_rest : 0.0, finish_lse(st));
    }
  });
}

template <typename T>
void cross_entropy_forward_typed(const T* x, int64_t x_stride, const int64_t* target,
                                 const acc_of<T>* weight, int64_t rows, int64_t classes,
                                 bool smoothing, double* nll, double* smooth, double* lse) {
  for (int64_t r = 0; r < rows; ++r) check_target(target[r], classes);
  cross_entropy_rows(
      x, x_stride, [=](int64_t r) { return target[r]; }, weight, rows, classes, smoothing,
      [=](int64_t r, double n, double sm, double l) {
        nll[r] = n;
        smooth[r] = sm;
        lse[r] = l;
      });
}

// W = sum_c w_c in class order (the number of classes without weights): counts[2], which only
// label smoothing reads (cross_entropy_rows.h), so the loss sums it only then.
template <typename acc_t>
double total_weight(const acc_t* weight, int64_t classes) {
  if (weight == nullptr) return static_cast<double>(classes);
  double total = 0;
  for (int64_t c = 0; c < classes; ++c) total += static_cast<double>(weight[c]);
  return total;
}

// The loss (per row, or reduced in row order in fp64: the same for every thread count), lse
// and counts: the pieces of each row and the epilogue of stablekernels/cross_entropy_rows.h.
//
// The targets are walked twice: once by the rows' walk (in parallel: each row's target logit
// and w_t), then once in row order, which checks every counted target (the first bad one in
// row order raises, as torch; a parallel check would raise whichever thread found one) and
// forms counts[0], counts[1] and, for "sum" and "mean", the LossTotals in the same walk. So
// the check comes after the rows' walk, which therefore reads class 0 for a counted target
// outside [0, classes), as for an ignored one: nothing is read outside a row, and what it
// wrote (lse, the rows' losses: new tensors) is dropped with the IndexError.
template <typename T>
void cross_entropy_loss_typed(const T* x, int64_t x_stride, const int64_t* target,
                              const acc_of<T>* weight, int64_t rows, const CrossEntropyOptions& o,
                              acc_of<T>* loss, double* lse, double* counts) {
  using acc_t = acc_of<T>;
  const bool smoothing = o.label_smoothing != 0;
  // counts[2] = W with label smoothing; without it no kernel reads it, and it is 0.
  counts[2] = smoothing ? total_weight(weight, o.classes) : 0.0;
  auto class_of = [=](int64_t r) {
    const int64_t t = target[r];
    return target_in_range(t, o) ? readable_target(t, o) : int64_t(0);
  };
  auto w_t = [=](int64_t c) { return weight == nullptr ? 1.0 : static_cast<double>(weight[c]); };
  auto check = [&](int64_t r) {
    TORCH_CHECK_INDEX(target_in_range(target[r], o), "Target ", target[r], " is out of bounds.");
  };
  if (o.reduction == Reduction::kNone) {
    cross_entropy_rows(x, x_stride, class_of, weight, rows, o.classes, smoothing,
                       [=](int64_t r, double nll, double smooth, double l) {
                         const bool counted = row_counts(target[r], o);
                         lse[r] = l;
                         const double w = w_t(class_of(r));
                         loss[r] = static_cast<acc_t>(row_loss(nll, smooth, l, w, counted, o));
                       });
    double weights = 0, counted = 0;
    for (int64_t r = 0; r < rows; ++r) {
      check(r);
      if (row_counts(target[r], o)) {
        weights += w_t(target[r]);
        counted += 1;
      }
    }
    counts[0] = weights;
    counts[1] = counted;
    return;
  }
  std::vector<double> nlls(rows), smooths(rows);
  cross_entropy_rows(x, x_stride, class_of, weight, rows, o.classes, smoothing,
                     [&](int64_t r, double nll, double smooth, double l) {
                       nlls[r] = nll;
                       smooths[r] = smooth;
                       lse[r] = l;
                     });
  LossTotals totals;
  for (int64_t r = 0; r < rows; ++r) {
    check(r);
    const int64_t t = target[r];
    totals.add(nlls[r], smooths[r], lse[r], w_t(readable_target(t, o)), row_counts(t, o), o);
  }
  loss[0] = static_cast<acc_t>(totals.result(o));
  counts[0] = totals.weight;  // sum of counted w_t, in row order
  counts[1] = totals.counted;
}

// dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c - [c == t] * one_hot, a pure map over
// the logits from each row's terms and class: row_of(r) -> (RowTerms<acc_t>, t). The target's
// entry is written once more with its one-hot term.
template <typename T, typename RowOf>
void cross_entropy_map(const T* x, int64_t x_stride, const acc_of<T>* weight, int64_t rows,
                       int64_t classes, T* dx, RowOf row_of) {
  using acc_t = acc_of<T>;
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / classes);
  const Store mode = store_for(rows * classes * int64_t(sizeof(T)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      T* dr = dx + r * classes;
      const auto [k, t] = row_of(r);
      const acc_t hi = k.hi, lo = k.lo, coef = k.coef, smooth = k.smooth, one_hot = k.one_hot;
      const V vhi(hi), vlo(lo), vcoef(coef), vsmooth(smooth);
      // The target's logit is read before the row is written: dx may be x itself (the
      // in-place op), every other element being read just before it is written.
      const acc_t x_t = static_cast<acc_t>(xr[t]);
      auto probability = [=](int64_t j, int64_t count) {
        return exp_nan_safe((io::load(xr + j, count) - vhi) - vlo);
      };
      if (weight == nullptr) {
        store_each<acc_t>(
            dr, classes,
            [=](int64_t j, int64_t count) {
              return at::vec::fmsub(probability(j, count), vcoef, vsmooth);
            },
            mode);
      } else {
        store_each<acc_t>(
            dr, classes,
            [=](int64_t j, int64_t count) {
              return at::vec::fmsub(probability(j, count), vcoef,
                                    vsmooth * V::loadu(weight + j, count));
            },
            mode);
      }
      const acc_t p = std::exp((x_t - hi) - lo);
      const acc_t w_t = weight == nullptr ? acc_t(1) : weight[t];
      dr[t] = static_cast<T>(p * coef - smooth * w_t - one_hot);
    }
  });
}

// The map from per-row terms (rows, 5) = (hi, lo, coef, smooth, one_hot) the caller computed.
template <typename T>
void cross_entropy_backward_typed(const T* x, int64_t x_stride, const int64_t* target,
                                  const acc_of<T>* weight, const acc_of<T>* terms, int64_t rows,
                                  int64_t classes, T* dx) {
  using acc_t = acc_of<T>;
  for (int64_t r = 0; r < rows; ++r) check_target(target[r], classes);
  cross_entropy_map(x, x_stride, weight, rows, classes, dx, [=](int64_t r) {
    const acc_t* k = terms + r * 5;
    return std::make_pair(RowTerms<acc_t>{k[0], k[1], k[2], k[3], k[4]}, target[r]);
  });
}

// The loss's backward: each row's terms from the loss's gradient (row_gradient, row_terms of
// stablekernels/cross_entropy_rows.h), then the map. grad_stride 0: one gradient for every
// row (a reduced loss); grad_lse may be null.
template <typename T>
void cross_entropy_loss_backward_typed(const acc_of<T>* grad, int64_t grad_stride,
                                       const double* grad_lse, int64_t grad_lse_stride,
                                       const T* x, int64_t x_stride, const int64_t* target,
                                       const acc_of<T>* weight, const double* lse,
                                       const double* counts, int64_t rows,
                                       const CrossEntropyOptions& o, T* dx) {
  using acc_t = acc_of<T>;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_INDEX(target_in_range(target[r], o), "Target ", target[r], " is out of bounds.");
  }
  cross_entropy_map(x, x_stride, weight, rows, o.classes, dx, [=](int64_t r) {
    const int64_t t = readable_target(target[r], o);
    const RowGradient g =
        row_gradient(static_cast<double>(grad[r * grad_stride]), row_counts(target[r], o), counts, o);
    const double w_t = weight == nullptr ? 1.0 : static_cast<double>(weight[t]);
    const double g_lse = grad_lse == nullptr ? 0.0 : grad_lse[r * grad_lse_stride];
    return std::make_pair(row_terms<acc_t>(g, g_lse, lse[r], w_t, counts[2], o), t);
  });
}

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
