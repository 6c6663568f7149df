// The CPU kernels' interface: raw pointers and a row layout, no tensors.
//
// csrc/cpu/kernels_impl.h is compiled once per CPU capability (DEFAULT, AVX2, AVX512; see
// kernels_*.cpp and capabilities.json), each filling one KernelTable; cpu_kernels() returns
// the table of the capability ATen itself runs with (ATEN_CPU_CAPABILITY is honoured).
#pragma once

#include <c10/core/ScalarType.h>
#include <stablekernels/cross_entropy_rows.h>
#include <stablekernels/layout.h>
#include <stablekernels/masked_rows.h>
#include <stablekernels/row_mask.h>

namespace stablekernels::cpu {

using stablekernels::Layout;
using stablekernels::CrossEntropyOptions;
using stablekernels::MaskedMode;
using stablekernels::MaskedRows;
using stablekernels::RowMask;

struct KernelTable {
  const char* capability;

  // y = softmax(x) (or log_softmax if `log`) along n. x and y may have different dtypes;
  // computed in fp32 (fp64 if either is fp64) and rounded once into y.
  void (*softmax_forward)(const void* x, c10::ScalarType x_type, void* y, c10::ScalarType y_type,
                          Layout layout, bool log);

  // out = logsumexp(x) along n in x's dtype, and lse the same in fp64 (what the backward
  // uses: a float lse at large offsets would put its rounding into every gradient entry).
  void (*logsumexp_forward)(const void* x, c10::ScalarType x_type, void* out, double* lse,
                            Layout layout);

  // dx from grad and y (same dtype, both contiguous): softmax dx = y * (grad - sum(grad * y));
  // log_softmax dx = grad - exp(y) * sum(grad). dx may have another dtype.
  void (*softmax_backward)(const void* grad, const void* y, c10::ScalarType y_type, void* dx,
                           c10::ScalarType dx_type, Layout layout, bool log);

  // dx = grad[r] * exp(x - lse[r]), a pure map, taken as (x - hi) - lo with hi + lo the fp64
  // lse split into the accumulation dtype (split_lse in stablekernels/online_softmax.h): x - hi
  // is exact near the lse, so the gradient keeps its precision at any offset. grad holds one
  // value per row of x's dtype at grad + r * grad_stride (0: one value for every row); lse is
  // contiguous fp64. dx is contiguous, of x's dtype.
  void (*logsumexp_backward)(const void* grad, int64_t grad_stride, const double* lse,
                             const void* x, c10::ScalarType x_type, void* dx, Layout layout);

  // Per-row statistics of cross-entropy for `rows` contiguous rows of `classes` logits (row r
  // at x + r * x_stride) and int64 targets in [0, classes), all fp64, with m = max, s' as in
  // stablekernels/online_softmax.h:
  //   nll[r]    = (m - x_t) + log1p(s')
  //   smooth[r] = sum_c w_c (m - x_c) + W log1p(s') if `smoothing`, else 0 (w_c the class
  //               weights in the accumulation dtype of x, or 1 without; W their sum)
  //   lse[r]    = finish_lse(m, s')
  // nll and smooth are arbitrary on rows whose max is not finite (the caller masks them by
  // lse); lse is right on every row.
  void (*cross_entropy_forward)(const void* x, c10::ScalarType x_type, int64_t x_stride,
                                const int64_t* target, const void* weight, int64_t rows,
                                int64_t classes, bool smoothing, double* nll, double* smooth,
                                double* lse);

  // dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c - [c == t] * one_hot, a pure map over
  // the logits (w_c = 1 without weights), with terms (rows, 5) = (hi, lo, coef, smooth,
  // one_hot) per row, contiguous, in the accumulation dtype of x. dx is contiguous
  // (rows, classes), of x's dtype.
  void (*cross_entropy_backward)(const void* x, c10::ScalarType x_type, int64_t x_stride,
                                 const int64_t* target, const void* weight, const void* terms,
                                 int64_t rows, int64_t classes, void* dx);

  // Masked softmax of `rows` contiguous rows of n elements of x: t_j = scale * x_j (in the
  // accumulation dtype) + mask_j if the mask is additive; -inf where a bool mask is false or,
  // if `causal`, where j > (r % query_len) + causal_offset (those past the limit are never
  // computed). mode (stablekernels/masked_rows.h): kSoftmax: y = softmax of t, kLogSoftmax:
  // log_softmax (0 / -inf where dropped; a NaN row NaN), kStatistics: y untouched (may be
  // null), kLogsumexp: y[r] = the lse of row r (rows values of y_type). A row with every
  // t_j = -inf ("dead") is 0 / -inf throughout, or NaN for MaskedRows::kNan. lse[r] =
  // logsumexp of t in fp64, -inf for a dead row.
  void (*masked_softmax_forward)(const void* x, c10::ScalarType x_type, void* y,
                                 c10::ScalarType y_type, int64_t rows, int64_t n,
                                 const RowMask& mask, double scale, bool causal, int64_t query_len,
                                 int64_t causal_offset, MaskedMode mode, MaskedRows masked_rows,
                                 double* lse);

  // Cross-entropy's loss in one call (stablekernels/cross_entropy_rows.h): counted targets
  // checked in row order (IndexError), each row's pieces and its epilogue; loss (rows values
  // for "none", one otherwise) in the accumulation dtype of x, lse per row in fp64, counts =
  // (sum of counted w_t, counted rows, W), W only with label smoothing (0 without).
  // Reductions add the rows in row order in fp64.
  void (*cross_entropy_loss)(const void* x, c10::ScalarType x_type, int64_t x_stride,
                             const int64_t* target, const void* weight, int64_t rows,
                             const CrossEntropyOptions& options, void* loss, double* lse,
                             double* counts);

  // Its dx (contiguous, x's dtype) from the loss's gradient (accumulation dtype; grad_stride 0
  // for one value for every row), grad_lse (fp64, may be null), and the forward's lse and
  // counts: each row's terms (row_gradient, row_terms), then cross_entropy_backward's map.
  void (*cross_entropy_loss_backward)(const void* grad, int64_t grad_stride,
                                      const double* grad_lse, int64_t grad_lse_stride,
                                      const void* x, c10::ScalarType x_type, int64_t x_stride,
                                      const int64_t* target, const void* weight,
                                      const double* lse, const double* counts, int64_t rows,
                                      const CrossEntropyOptions& options, void* dx);

  // The linear cross-entropy's tile epilogues (stablekernels/linear_tiles.h) of `rows`
  // contiguous rows of n raw logits y (fp32 or fp64; classes [class_start, class_start + n)),
  // int64 targets (any: the tile holds those in its range), weight null or all the classes'
  // weights (y's dtype), softcap 0 for none. Forward: each row merged into state (rows, 10)
  // fp64 (class_start 0 initialises it); y is only read. Backward: y overwritten by dy from
  // terms (rows, 5) and grad_entropy (rows,) or null, both of y's dtype.
  void (*cross_entropy_tile)(const void* y, c10::ScalarType type, int64_t rows, int64_t n,
                             const int64_t* target, int64_t class_start, const void* weight,
                             double softcap, double temperature, bool smoothing, bool entropy,
                             double* state);
  void (*cross_entropy_tile_backward)(void* y, c10::ScalarType type, int64_t rows, int64_t n,
                                      const int64_t* target, int64_t class_start,
                                      const void* weight, const void* terms, double softcap,
                                      double temperature, const void* grad_entropy);

  // The masked softmax's dx (contiguous (rows, n), of dx_type) from grad and y (contiguous,
  // y_type) and the forward's fp64 lse (rows): per row, 0 where lse is -inf; else scale * the
  // softmax (log_softmax if `log`) backward above, and for log_softmax 0 where y is -inf
  // (masked_gradient, stablekernels/masked_rows.h).
  void (*masked_softmax_backward)(const void* grad, const void* y, c10::ScalarType y_type,
                                  const double* lse, void* dx, c10::ScalarType dx_type,
                                  int64_t rows, int64_t n, double scale, bool log);
};

namespace capability_default {
extern const KernelTable kTable;
}
namespace capability_avx2 {
extern const KernelTable kTable;
}
namespace capability_avx512 {
extern const KernelTable kTable;
}

// The table for the CPU capability ATen runs with here.
const KernelTable& cpu_kernels();

}  // namespace stablekernels::cpu
