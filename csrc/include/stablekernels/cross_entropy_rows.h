// The per-row algebra of cross-entropy with class targets: what a kernel does with a row's
// statistics once it has them (the forward's epilogue: the loss; the backward's prologue: the
// coefficients of dx), written once for the CPU and CUDA kernels (host/device, no torch).
// The same rules in Python: stablekernels/backends/torch_ce.py (the torch reference, also the
// epilogue of a backend that gives only the row pieces); in Triton:
// stablekernels/backends/triton/cross_entropy.py. docs/design.md states them.
//
// A row has logits x (C classes), a target t, class weights w (all 1 without weights, W their
// sum), label smoothing e and z-loss z. Its pieces (fp64), with m = max(x), s' as in
// online_softmax.h:
//
//     nll    = (m - x_t) + log1p(s')                = lse - x_t
//     smooth = sum_c w_c (m - x_c) + W log1p(s')    = sum_c w_c (lse - x_c)   (only if e > 0)
//     lse    = m + log1p(s')
//
// A row counts when t != ignore_index; a counted t outside [0, C) is an error (IndexError on
// the CPU, a device-side assert on CUDA). A counted row's loss:
//
//     ce   = (1 - e) w_t nll + (e / C) smooth
//     loss = ce + z lse^2            NaN where lse is not finite (a NaN, a +inf, or only -inf)
//
// and 0 for a row that does not count. Reductions, as torch's (all sums in fp64, in row
// order, rounded once into the loss):
//
//     "none"  the rows' losses
//     "sum"   sum of the rows' losses
//     "mean"  sum_r ce_r / sum_r w_t(r) + z sum_r lse_r^2 / count     (over counted rows)
//
// so the z-loss is a per-row penalty never weighted by the class weights, and its mean is over
// the counted rows (NaN when none counts, as the loss itself). The forward also gives
// `counts` = (sum of counted w_t, number of counted rows, W), fp64: what "mean" divides by,
// and the weights' sum the smoothing term of the backward needs (W = C without weights); the
// backward takes it back, so it never reduces anything itself. counts[0] and counts[1] are
// needed for "mean" only and counts[2] with label smoothing only, and no backward reads them
// otherwise: the CUDA and Triton kernels do not count the rows for "none" (they write 0 to
// counts[0] and counts[1]), and every kernel forms W only with label smoothing (0 without).
// Every element is written: no op output holds uninitialised memory.
//
// Backward, with the loss's gradient g (per row for "none", one value otherwise): a counted
// row's ce term gets g_ce and its z term g_z,
//
//     "none", "sum":  g_ce = g_z = g          "mean":  g_ce = g / counts[0], g_z = g / counts[1]
//
// (0 on a row that does not count), and with grad_lse the gradient of the lse output:
//
//     dx_c = p_c coef - smooth w_c - [c == t] one_hot,      p_c = exp((x_c - hi) - lo)
//     coef = g_ce ((1 - e) w_t + e W / C) + g_z 2 z lse + grad_lse
//     smooth = (e / C) g_ce,   one_hot = (1 - e) g_ce w_t
//
// with hi + lo the fp64 lse split into the accumulation dtype (x_c - hi is exact near lse).
#pragma once

#include <stablekernels/online_softmax.h>

#include <cmath>
#include <cstdint>

namespace stablekernels {

// torch's reductions, named as the public argument (the kernels' bindings parse the name).
enum class Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

// What a call's rows share.
struct CrossEntropyOptions {
  int64_t classes;
  int64_t ignore_index;
  double label_smoothing;  // e
  double z_loss;           // z
  Reduction reduction;
};

SK_HOST_DEVICE bool row_counts(int64_t target, const CrossEntropyOptions& o) {
  return target != o.ignore_index;
}

// A target the kernels may read: in [0, classes) for a counted row (else a bad target), and
// the class 0 for a row that does not count.
SK_HOST_DEVICE bool target_in_range(int64_t target, const CrossEntropyOptions& o) {
  return !row_counts(target, o) || (target >= 0 && target < o.classes);
}
SK_HOST_DEVICE int64_t readable_target(int64_t target, const CrossEntropyOptions& o) {
  return row_counts(target, o) ? target : 0;
}

// A counted row's cross-entropy term ce (without the z-loss), from its pieces.
SK_HOST_DEVICE double row_cross_entropy(double nll, double smooth, double w_t,
                                        const CrossEntropyOptions& o) {
  const double e = o.label_smoothing;
  double loss = ((1 - e) * w_t) * nll;
  if (e != 0) loss = loss + (e / static_cast<double>(o.classes)) * smooth;
  return loss;
}

// A row's loss as "none" gives it (0 when the row does not count).
SK_HOST_DEVICE double row_loss(double nll, double smooth, double lse, double w_t, bool counted,
                               const CrossEntropyOptions& o) {
  using std::isfinite;
  if (!counted) return 0.0;
  double loss = row_cross_entropy(nll, smooth, w_t, o);
  if (o.z_loss != 0) loss = loss + (o.z_loss * lse) * lse;
  return isfinite(lse) ? loss : static_cast<double>(NAN);
}

// The running sums of a reduction over rows (each row added in row order).
struct LossTotals {
  double loss = 0;     // "sum": the rows' losses; "mean": their ce terms
  double z = 0;        // "mean": sum of lse^2 over counted rows
  double weight = 0;   // sum of counted w_t
  double counted = 0;  // number of counted rows

  SK_HOST_DEVICE void add(double nll, double smooth, double lse, double w_t, bool counted_row,
                          const CrossEntropyOptions& o) {
    using std::isfinite;
    if (!counted_row) return;
    weight += w_t;
    counted += 1;
    if (o.reduction == Reduction::kMean) {
      const double ce = row_cross_entropy(nll, smooth, w_t, o);
      loss += isfinite(lse) ? ce : static_cast<double>(NAN);
      z += lse * lse;
    } else {
      loss += row_loss(nll, smooth, lse, w_t, true, o);
    }
  }

  // The reduced loss ("sum" or "mean").
  SK_HOST_DEVICE double result(const CrossEntropyOptions& o) const {
    if (o.reduction != Reduction::kMean) return loss;
    double mean = loss / weight;
    if (o.z_loss != 0) mean = mean + o.z_loss * z / counted;
    return mean;
  }
};

// The loss's gradient on a row's ce and z terms (see the file comment).
struct RowGradient {
  double ce;
  double z;
};

// g: the row's gradient ("none") or the reduced loss's; counts: the forward's (counts[0] and
// counts[1] read for "mean" only).
SK_HOST_DEVICE RowGradient row_gradient(double g, bool counted, const double* counts,
                                        const CrossEntropyOptions& o) {
  if (!counted) return {0.0, 0.0};
  if (o.reduction == Reduction::kMean) return {g / counts[0], g / counts[1]};
  return {g, g};
}

// The coefficients of a row's dx (see the file comment), in the accumulation dtype.
template <typename acc_t>
struct RowTerms {
  acc_t hi, lo, coef, smooth, one_hot;
};

// total_weight: W, counts[2] of the forward (the number of classes without weights).
template <typename acc_t>
SK_HOST_DEVICE RowTerms<acc_t> row_terms(RowGradient g, double grad_lse, double lse, double w_t,
                                         double total_weight, const CrossEntropyOptions& o) {
  const double e = o.label_smoothing;
  const double classes = static_cast<double>(o.classes);
  // W is read only with smoothing (counts[2] is 0 without it).
  const double spread = e != 0 ? e * total_weight / classes : 0.0;
  double coef = g.ce * ((1 - e) * w_t + spread) + grad_lse;
  if (o.z_loss != 0) coef = coef + g.z * (2 * o.z_loss) * lse;
  const LseSplit<acc_t> split = split_lse<acc_t>(lse);
  return {split.hi, split.lo, static_cast<acc_t>(coef), static_cast<acc_t>((e / classes) * g.ce),
          static_cast<acc_t>(((1 - e) * g.ce) * w_t)};
}

}  // namespace stablekernels
