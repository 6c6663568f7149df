// The per-row arithmetic of the linear cross-entropy's tile epilogues, written once for the CPU
// and CUDA kernels (host/device, no torch). The same rules in Python:
// stablekernels/backends/torch_tiles.py; in Triton: stablekernels/backends/triton/tiles.py.
// docs/linear_cross_entropy.md states them.
//
// A tile is rows x V_tile of raw logits y = x W_k^T + b_k (contiguous, accumulation dtype),
// classes [class_start, class_start + V_tile). The logits proper are
//
//     z = softcap * tanh((y / temperature) / softcap)     (z = y / temperature without softcap)
//
// Forward: each tile's row is reduced to a TilePart (the online state of
// stablekernels/online_softmax.h plus two sums), which merges into a running per-row state of
// kTileStateFields doubles (R, 10), the first tile (class_start 0) initialising it:
//
//     0 m, 1 s'        the row's (m, s') so far (merge rule of online_softmax.h)
//     2 gaps           sum_c w_c (m - z_c), every term >= 0, moved to a new max as
//                      gaps + (m_new - m) W (only with label smoothing; else 0)
//     3 W              sum_c w_c of the classes seen (only with label smoothing; else 0)
//     4 ent            sum_c exp(z_c - m) (m - z_c), every term >= 0, moved to a new max as
//                      exp(m - m_new) (ent + (m_new - m)(1 + s')) (only with entropy; else 0)
//     5 z_t            the target's logit, written by the tile that holds the target
//     6 nll = (m - z_t) + log1p(s')          7 smooth = gaps + W log1p(s')
//     8 lse = finish_lse(m, s')              9 H = ent / (1 + s') + log1p(s')  (NaN where the
//                                              lse is not finite)
//
// Fields 6 to 9 are rewritten by every tile from the merged state: after the last tile they
// are the row's (nll, smooth, lse, entropy), with no finishing pass. Every added term is >= 0,
// so a dominant tile keeps the others' precision (as the merge of docs/design.md, 1.2).
//
// Backward: per element, from the row's terms (hi, lo, coef, smooth, one_hot) of
// cross_entropy_rows.h and the entropy's gradient g_H,
//
//     p = exp((z_c - hi) - lo)
//     dz_c = p coef - smooth w_c - [c == t] one_hot - g_H p ((z_c - hi) - lo)
//     dy_c = dz_c (1 - tanh^2) / temperature                    (the chain to y)
//
// the one-hot term only in the tile that holds the target.
#pragma once

#include <stablekernels/online_softmax.h>

#include <cmath>
#include <cstdint>

namespace stablekernels {

constexpr int kTileStateFields = 10;
enum TileField : int {
  kTileM = 0,
  kTileS = 1,
  kTileGaps = 2,
  kTileWeights = 3,
  kTileEntropy = 4,
  kTileTarget = 5,
  kTileNll = 6,
  kTileSmooth = 7,
  kTileLse = 8,
  kTileH = 9,
};

// The logit transform of a call: z = y / temperature, capped by softcap * tanh(z / softcap)
// when `capped` (the operations and their order those of the torch reference). Division by a
// call's scalar is what torch does on each device: a division on the CPU, a product with the
// scalar's reciprocal (rounded once, in acc_t) on a GPU, as torch's CUDA division by a scalar
// (and no call of the IEEE division's slow path, which would spill the kernel's registers).
template <typename acc_t>
struct LogitTransform {
  acc_t softcap;
  acc_t temperature;
  bool capped;
  acc_t inv_softcap;      // 1 / softcap, rounded once (the GPU's products)
  acc_t inv_temperature;  // 1 / temperature, rounded once

  static SK_HOST_DEVICE LogitTransform make(double softcap, double temperature) {
    const bool capped = softcap != 0;
    return {static_cast<acc_t>(softcap), static_cast<acc_t>(temperature), capped,
            static_cast<acc_t>(capped ? 1 / static_cast<acc_t>(softcap) : acc_t(1)),
            static_cast<acc_t>(1 / static_cast<acc_t>(temperature))};
  }

  SK_HOST_DEVICE acc_t by_temperature(acc_t v) const {
#if defined(__CUDA_ARCH__)
    return v * inv_temperature;
#else
    return v / temperature;
#endif
  }

  // z of a raw logit y; *tanh_out gets the softcap's tanh (unset without softcap).
  SK_HOST_DEVICE acc_t apply(acc_t y, acc_t* tanh_out = nullptr) const {
    using std::tanh;
    acc_t z = temperature != acc_t(1) ? by_temperature(y) : y;
    if (capped) {
#if defined(__CUDA_ARCH__)
      const acc_t t = tanh(z * inv_softcap);
#else
      const acc_t t = tanh(z / softcap);
#endif
      if (tanh_out != nullptr) *tanh_out = t;
      z = t * softcap;
    }
    return z;
  }

  // dz along z to dz along y: through the softcap (1 - tanh^2) and the temperature.
  SK_HOST_DEVICE acc_t chain(acc_t dz, acc_t t) const {
    if (capped) dz *= acc_t(1) - t * t;
    if (temperature != acc_t(1)) dz = by_temperature(dz);
    return dz;
  }
};

// A piece of a row (a tile's row, or a part of one): its (m, s') and, relative to its m, the
// sums gaps = sum w_c (m - z_c), weights = sum w_c and ent = sum exp(z_c - m) (m - z_c).
struct TilePart {
  double m, s, gaps, weights, ent;

  static SK_HOST_DEVICE TilePart empty() { return {-static_cast<double>(INFINITY), -1.0, 0, 0, 0}; }
};

// ent of a part moved to the merged max mm: exp(m - mm) (ent + (mm - m)(1 + s')); 0 when the
// factor is 0 (a part whose every exp vanishes, the empty part too).
SK_HOST_DEVICE double moved_entropy(const TilePart& a, double mm) {
  using std::exp;
  if (a.m == mm) return a.ent;
  const double f = exp(a.m - mm);
  return f == 0 ? 0.0 : f * (a.ent + (mm - a.m) * (1 + a.s));
}

// The merge of two parts of a row: the (m, s') rule, each side's sums moved to the merged max.
SK_HOST_DEVICE TilePart merge_parts(const TilePart& a, const TilePart& b) {
  const RowState<double> st = merge(RowState<double>{a.m, a.s}, RowState<double>{b.m, b.s});
  double gaps = a.gaps + b.gaps;
  // A side already at the merged max moves by nothing (also both at -inf, where the
  // difference would be NaN).
  if (a.weights > 0 && st.m != a.m) gaps += (st.m - a.m) * a.weights;
  if (b.weights > 0 && st.m != b.m) gaps += (st.m - b.m) * b.weights;
  return {st.m, st.s, gaps, a.weights + b.weights, moved_entropy(a, st.m) + moved_entropy(b, st.m)};
}

// Merges a tile's part of row `state` (kTileStateFields doubles) into it, the first tile
// initialising it; has_target: the tile holds the row's target, whose logit is z_t. Rewrites
// the finished fields (nll, smooth, lse, H) from the merged state.
SK_HOST_DEVICE void merge_tile_row(double* state, const TilePart& part, bool first,
                                   bool has_target, double z_t) {
  using std::isfinite;
  using std::log1p;
  const TilePart before =
      first ? TilePart::empty()
            : TilePart{state[kTileM], state[kTileS], state[kTileGaps], state[kTileWeights],
                       state[kTileEntropy]};
  const TilePart now = merge_parts(before, part);
  const double target = has_target ? z_t : first ? 0.0 : state[kTileTarget];
  const double log_rest = log1p(now.s);
  const double lse = finish_lse<double>(RowState<double>{now.m, now.s});
  state[kTileM] = now.m;
  state[kTileS] = now.s;
  state[kTileGaps] = now.gaps;
  state[kTileWeights] = now.weights;
  state[kTileEntropy] = now.ent;
  state[kTileTarget] = target;
  state[kTileNll] = (now.m - target) + log_rest;
  state[kTileSmooth] = now.gaps + now.weights * log_rest;
  state[kTileLse] = lse;
  state[kTileH] = isfinite(lse) ? now.ent / (1 + now.s) + log_rest : static_cast<double>(NAN);
}

// The entropy sum's term of one element z of a part whose max is m, given e = exp(z - m):
// e (m - z), 0 where e is 0 (a -inf logit, whose m - z is +inf).
template <typename acc_t>
SK_HOST_DEVICE acc_t entropy_term(acc_t z, acc_t m, acc_t e) {
  return e > acc_t(0) ? e * (m - z) : acc_t(0);
}

// A smoothing gap w (m - z): +inf for a -inf logit (torch's smooth term is then inf too), also
// where m is -inf.
template <typename acc_t>
SK_HOST_DEVICE acc_t gap_term(acc_t z, acc_t m, acc_t w) {
  using std::isinf;
  return w * (isinf(z) && z < acc_t(0) ? static_cast<acc_t>(INFINITY) : m - z);
}

// dy of one element (see the file comment): z its logit, t the softcap's tanh, w its class
// weight, target: the element is the row's target; g_entropy: the entropy's gradient (0:
// none).
template <typename acc_t>
SK_HOST_DEVICE acc_t tile_gradient(acc_t z, acc_t t, acc_t hi, acc_t lo, acc_t coef, acc_t smooth,
                                   acc_t one_hot, acc_t w, bool target, acc_t g_entropy,
                                   const LogitTransform<acc_t>& f) {
  using std::exp;
  const acc_t shifted = (z - hi) - lo;
  const acc_t p = exp(shifted);
  acc_t dz = p * coef - smooth * w;
  if (target) dz -= one_hot;
  if (g_entropy != acc_t(0)) dz -= (p > acc_t(0) ? p * shifted : acc_t(0)) * g_entropy;
  return f.chain(dz, t);
}

}  // namespace stablekernels
