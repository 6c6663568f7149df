// The linear cross-entropy's tile epilogues on the CPU (stablekernels/linear_tiles.h): the
// forward folds a tile of raw logits into each row's running state, the backward overwrites the
// tile with the gradient along the raw logits. Part of kernels_impl.h, compiled once per CPU
// capability: it opens that file's namespace (one copy per capability) and is not compiled on
// its own.
//
// The tile's row statistics are the cross-entropy kernel's: chunk_stats (row_stats.h) for
// (m, s'), chunk_gaps (cross_entropy_kernels.h) for the smoothing sums; the entropy sum and the
// logit transform are the loops below. A row is taken in chunks of kChunk elements (a tile's
// row is at most 4096 long; the whole-vocabulary chunk of the forward with gradient is one
// tile), each chunk a TilePart merged by merge_parts. With a softcap or a temperature the
// chunk's logits are transformed into a per-thread buffer first (the tile itself is not
// written by the forward).

#pragma once

#ifndef SK_CAPABILITY_NAMESPACE
#error "this header is part of kernels_impl.h: include that, with SK_CAPABILITY_NAMESPACE set"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <stablekernels/linear_tiles.h>
#include <stablekernels/online_softmax.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cross_entropy_kernels.h"
#include "kernels.h"
#include "load_store.h"
#include "row_stats.h"
#include "vec_math.h"

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

// z = f(y) of a vector of raw logits, the softcap's tanh in *t (left as is without softcap).
template <typename acc_t>
inline Vectorized<acc_t> transform_vec(Vectorized<acc_t> y, const LogitTransform<acc_t>& f,
                                       Vectorized<acc_t>* t = nullptr) {
  using V = Vectorized<acc_t>;
  V z = f.temperature != acc_t(1) ? y / V(f.temperature) : y;
  if (f.capped) {
    const V th = (z / V(f.softcap)).tanh();
    if (t != nullptr) *t = th;
    z = th * V(f.softcap);
  }
  return z;
}

// sum over a chunk of exp(z - m) (m - z), the terms whose exp is 0 left out (m finite).
template <typename acc_t>
double chunk_entropy(const acc_t* z, int64_t len, acc_t m) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const V vm(m), zero(acc_t(0));
  BlockSum<acc_t> sum;
  for (int64_t j = 0; j < len; j += kVec) {
    const int64_t count = std::min(kVec, len - j);
    const V d = vm - V::loadu(z + j, count);
    const V e = exp_nan_safe(zero - d);
    sum.add(V::set(zero, V::blendv(zero, e * d, e > zero), count));
  }
  return sum.result();
}

// The forward epilogue of `rows` contiguous rows of n raw logits y (classes [class_start,
// class_start + n)) into state (rows, kTileStateFields); weight: all V class weights or null.
template <typename acc_t>
void cross_entropy_tile_typed(const acc_t* y, int64_t rows, int64_t n, const int64_t* target,
                              int64_t class_start, const acc_t* weight,
                              const LogitTransform<acc_t>& f, bool smoothing, bool entropy,
                              double* state) {
  const bool transform = f.capped || f.temperature != acc_t(1);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(transform ? std::min(n, kChunk) : 0);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* yr = y + r * n;
      const int64_t local = target[r] - class_start;
      const bool held = local >= 0 && local < n;
      TilePart row = TilePart::empty();
      double z_t = 0;
      for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const int64_t len = std::min(kChunk, n - c0);
        const acc_t* z = yr + c0;
        if (transform) {
          store_each<acc_t>(buffer.data(), len, [=](int64_t j, int64_t count) {
            return transform_vec(Vectorized<acc_t>::loadu(z + j, count), f);
          });
          z = buffer.data();
        }
        // the target's logit exactly as the statistics saw it
        if (held && local >= c0 && local < c0 + len) z_t = static_cast<double>(z[local - c0]);
        const State c = chunk_stats<acc_t, acc_t>(z, len);
        TilePart part{c.m, c.s, 0.0, 0.0, 0.0};
        if (smoothing) {
          const auto [gaps, weights] = chunk_gaps<acc_t, acc_t>(
              z, len, static_cast<acc_t>(c.m), weight == nullptr ? nullptr : weight + class_start + c0);
          part.gaps = gaps;
          part.weights = weights;
        }
        if (entropy && std::isfinite(c.m) && !std::isnan(c.s)) {
          part.ent = chunk_entropy(z, len, static_cast<acc_t>(c.m));
        }
        row = merge_parts(row, part);
      }
      merge_tile_row(state + r * kTileStateFields, row, class_start == 0, held, z_t);
    }
  });
}

// The backward epilogue: y (rows, n) overwritten by dy from terms (rows, 5) = (hi, lo, coef,
// smooth, one_hot) and g_entropy (rows,) or null.
template <typename acc_t>
void cross_entropy_tile_backward_typed(acc_t* y, int64_t rows, int64_t n, const int64_t* target,
                                       int64_t class_start, const acc_t* weight,
                                       const acc_t* terms, const LogitTransform<acc_t>& f,
                                       const acc_t* g_entropy) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
  const acc_t* w = weight == nullptr ? nullptr : weight + class_start;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* yr = y + r * n;
      const acc_t* k = terms + r * 5;
      const V hi(k[0]), lo(k[1]), coef(k[2]), smooth(k[3]), zero(acc_t(0));
      const acc_t one_hot = k[4];
      const acc_t g = g_entropy == nullptr ? acc_t(0) : g_entropy[r];
      const int64_t local = target[r] - class_start;
      const bool held = local >= 0 && local < n;
      // Each vector is read just before it is written (store_each): y may be overwritten.
      store_each<acc_t>(yr, n, [&](int64_t j, int64_t count) {
        V t = zero;
        const V z = transform_vec(V::loadu(yr + j, count), f, &t);
        const V shifted = (z - hi) - lo;
        const V p = exp_nan_safe(shifted);
        V dz = at::vec::fmsub(p, coef, w == nullptr ? smooth : smooth * V::loadu(w + j, count));
        if (held && local >= j && local < j + count) {
          alignas(64) acc_t lanes[kVec] = {};
          lanes[local - j] = one_hot;
          dz = dz - V::loadu(lanes);
        }
        if (g != acc_t(0)) dz = dz - V::blendv(zero, p * shifted, p > zero) * V(g);
        if (f.capped) dz = dz * (V(acc_t(1)) - t * t);
        if (f.temperature != acc_t(1)) dz = dz / V(f.temperature);
        return dz;
      });
    }
  });
}

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
