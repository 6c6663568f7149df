// The CUDA kernels' interface: raw pointers, the row Layout, a stream. No torch header, so
// nvcc compiles the kernels on any machine (CI has nvcc but no GPU and a CPU-only torch).
//
// Every launcher runs on `stream` and allocates nothing: the split path of long rows takes
// a workspace from the caller (workspace_bytes), so the kernels are safe under CUDA graph
// capture. Offsets are 64-bit.
#pragma once

#include <cuda_runtime.h>
#include <stablekernels/cross_entropy_rows.h>
#include <stablekernels/layout.h>
#include <stablekernels/masked_rows.h>
#include <stablekernels/row_mask.h>

#include <cstddef>

namespace stablekernels::cuda {

enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// The accumulation dtype of a kernel reading `in` and writing `out`: fp64 if either is.
inline Dtype accumulation(Dtype in, Dtype out) {
  return in == Dtype::kFloat64 || out == Dtype::kFloat64 ? Dtype::kFloat64 : Dtype::kFloat32;
}

// Whether the kernels write `out` directly from `in`: out is in's dtype or the accumulation
// dtype. Other pairs (fp32 -> fp16, say) are written in the accumulation dtype and converted
// by the caller, which is the same single rounding.
inline bool writes_directly(Dtype in, Dtype out) {
  return out == in || out == accumulation(in, out);
}

// Bytes of workspace the launchers below need for `layout` (0 when rows fit one block).
size_t workspace_bytes(const Layout& layout, Dtype in, Dtype out);

// y = softmax(x) (log_softmax if `log`) along n; y contiguous, of dtype y_type
// (writes_directly(x_type, y_type) must hold).
cudaError_t softmax_forward(const void* x, Dtype x_type, void* y, Dtype y_type,
                            const Layout& layout, bool log, void* workspace, cudaStream_t stream);

// out (x's dtype) and lse (fp64) per row: logsumexp of x along n.
cudaError_t logsumexp_forward(const void* x, Dtype x_type, void* out, double* lse,
                              const Layout& layout, void* workspace, cudaStream_t stream);

// dx from grad and y (both contiguous, dtype y_type; dx of dx_type with
// writes_directly(y_type, dx_type)): softmax dx = y * (grad - sum(grad * y)); log_softmax
// dx = grad - exp(y) * sum(grad).
cudaError_t softmax_backward(const void* grad, const void* y, Dtype y_type, void* dx, Dtype dx_type,
                             const Layout& layout, bool log, void* workspace, cudaStream_t stream);

// dx = grad[r] * exp((x - hi[r]) - lo[r]), a pure map, with hi + lo the fp64 lse[r] split into
// the accumulation dtype (split_lse, online_softmax.h); grad one value per row of x's dtype at
// grad + r * grad_stride (0: one value for every row); dx contiguous, of x's dtype.
cudaError_t logsumexp_backward(const void* grad, int64_t grad_stride, const double* lse,
                               const void* x, Dtype x_type, void* dx, const Layout& layout,
                               cudaStream_t stream);

// Per-row cross-entropy statistics, fp64, of `rows` rows of `classes` logits (row r at
// x + r * x_stride) and int64 targets in [0, classes): nll = (m - x_t) + log1p(s'), smooth =
// sum_c w_c (m - x_c) + W log1p(s') if `smoothing` (w the optional class weights, in the
// accumulation dtype of x, else 1; W their sum), else 0, and lse. nll and smooth are
// arbitrary on rows whose max is not finite; lse is right on every row.
cudaError_t cross_entropy_forward(const void* x, Dtype x_type, int64_t x_stride,
                                  const int64_t* target, const void* weight, int64_t rows,
                                  int64_t classes, bool smoothing, double* nll, double* smooth,
                                  double* lse, cudaStream_t stream);

// dx (contiguous, x's dtype): dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c
// - [c == t] * one_hot, with terms = (hi, lo, coef, smooth, one_hot) per row, (rows, 5)
// contiguous, in the accumulation dtype of x.
cudaError_t cross_entropy_backward(const void* x, Dtype x_type, int64_t x_stride,
                                   const int64_t* target, const void* weight, const void* terms,
                                   int64_t rows, int64_t classes, void* dx, cudaStream_t stream);

// Cross-entropy's loss of `rows` rows of `classes` = options.classes logits (row r at x +
// r * x_stride) with int64 targets, in one kernel: the per-row algebra of
// stablekernels/cross_entropy_rows.h (options: ignore_index, label smoothing, z-loss,
// reduction). weight: the optional class weights, in the accumulation dtype A of x. Writes
// lse[r] (fp64) for every row, and
// - "none": loss[r] (A), the row's loss (0 where the row does not count);
// - "sum", "mean": loss[0] (A), the reduced loss, and counts[0] = sum of the counted rows'
//   w_t, counts[1] = the number of counted rows (fp64), from the rows' totals in `scratch`
//   (cross_entropy_loss_scratch(rows, reduction) doubles) added by a second kernel, one block,
//   in a fixed order (the same bits on every run);
// - counts[2] = W, the sum of the class weights (classes without weights), when
//   label_smoothing != 0.
// The counts it does not write (counts[0], counts[1] for "none"; counts[2] without label
// smoothing) are left as they were: the backward reads none of them. A counted target (one
// != ignore_index) outside [0, classes) is a device-side assert (raised once the block has
// walked its rows; nothing is read outside a row: such a row reads class 0, as a row that
// does not count, whose loss is 0). Launches: 1 for "none", 2 for "sum" and "mean".
cudaError_t cross_entropy_loss_forward(const void* x, Dtype x_type, int64_t x_stride,
                                       const int64_t* target, const void* weight, int64_t rows,
                                       const CrossEntropyOptions& options, void* loss, double* lse,
                                       double* counts, double* scratch, cudaStream_t stream);

// The doubles of scratch that cross_entropy_loss_forward needs: a row's LossTotals each for
// "sum" and "mean", none for "none" (scratch may be null).
constexpr int64_t kCrossEntropyTotalsFields = 4;
inline int64_t cross_entropy_loss_scratch(int64_t rows, Reduction reduction) {
  return reduction == Reduction::kNone ? 0 : kCrossEntropyTotalsFields * rows;
}

// dx (contiguous, x's dtype) of cross_entropy_loss_forward's loss, one kernel: per row, with
// g = grad_loss[r * grad_loss_stride] (A; stride 0: one value for every row) and the lse
// output's gradient grad_lse[r * grad_lse_stride] (fp64; null: 0), the terms row_terms of
// row_gradient (cross_entropy_rows.h) from the forward's lse and counts, then dx_c =
// exp((x_c - hi) - lo) * coef - smooth * w_c - [c == t] * one_hot (t only on counted rows).
// A counted target outside [0, classes) is a device-side assert, as in the forward.
cudaError_t cross_entropy_loss_backward(const void* grad_loss, int64_t grad_loss_stride,
                                        const double* grad_lse, int64_t grad_lse_stride,
                                        const void* x, Dtype x_type, int64_t x_stride,
                                        const int64_t* target, const void* weight,
                                        const double* lse, const double* counts, int64_t rows,
                                        const CrossEntropyOptions& options, void* dx,
                                        cudaStream_t stream);

using stablekernels::MaskedMode;  // stablekernels/masked_rows.h
using stablekernels::MaskedRows;
using stablekernels::RowMask;  // stablekernels/row_mask.h

// Masked softmax of `rows` contiguous rows of n elements of x (row r at x + r * n), in the
// accumulation dtype A of (x_type, y_type): t_j = scale * x_j (+ mask_j if additive); -inf
// where a bool mask is false or, if `causal`, where j > (r % query_len) + causal_offset (the
// elements past that limit are neither read nor exponentiated). mode kSoftmax: y = softmax
// of t, kLogSoftmax: log_softmax; y contiguous, of y_type (writes_directly(x_type, y_type)
// must hold), 0 / -inf where dropped; a row with every t_j = -inf ("dead") 0 / -inf
// throughout (NaN for MaskedRows::kNan), a row with a NaN or a +inf t NaN throughout.
// kStatistics: y unused (may be null), lse only. kLogsumexp: y[r] (rows values of y_type) =
// lse[r] (NaN on a dead row for kNan). lse[r] (fp64) = m + log1p(s') of row r: -inf for a
// dead row, NaN for a NaN row, +inf for a row with +inf.
// Rows of up to 8192 elements are held in registers (a group of 4 to 512 threads per row);
// longer rows are walked by one block of 512 threads, which reads x (and the mask) twice.
// No workspace.
cudaError_t masked_softmax_forward(const void* x, Dtype x_type, void* y, Dtype y_type, int64_t rows,
                                   int64_t n, const RowMask& mask, double scale, bool causal,
                                   int64_t query_len, int64_t causal_offset, MaskedMode mode,
                                   MaskedRows masked_rows, double* lse, cudaStream_t stream);

// dx (contiguous (rows, n), of dx_type with writes_directly(y_type, dx_type)) of the masked
// softmax from grad and y (contiguous, y_type) and the forward's fp64 lse (rows): per row, 0
// where lse is -inf, else masked_gradient (stablekernels/masked_rows.h) of the softmax
// (log_softmax if `log`) backward of softmax_backward: scale times it, 0 where y is -inf for
// log_softmax. One launch; no workspace (rows longer than a group of 512 threads holds are
// walked twice by a block each).
cudaError_t masked_softmax_backward(const void* grad, const void* y, Dtype y_type,
                                    const double* lse, void* dx, Dtype dx_type, int64_t rows,
                                    int64_t n, double scale, bool log, cudaStream_t stream);

// The linear cross-entropy's tile epilogues (stablekernels/linear_tiles.h; linear_tiles.cu):
// `rows` contiguous rows of n raw logits y of type (fp32 or fp64) for the classes
// [class_start, class_start + n), int64 targets (the tile holds those in its range), weight
// null or all the classes' weights (y's type), softcap 0 for none. The forward merges each row
// into state (rows, kTileStateFields) fp64 (class_start 0 initialises it), y only read; the
// backward overwrites y with the gradient along it from terms (rows, 5) and grad_entropy
// (rows,) or null (y's type). One launch each, a block per row; no workspace.
cudaError_t cross_entropy_tile_forward(const void* y, Dtype type, int64_t rows, int64_t n,
                                       const int64_t* target, int64_t class_start,
                                       const void* weight, double softcap, double temperature,
                                       bool smoothing, bool entropy, double* state,
                                       cudaStream_t stream);
cudaError_t cross_entropy_tile_backward(void* y, Dtype type, int64_t rows, int64_t n,
                                        const int64_t* target, int64_t class_start,
                                        const void* weight, const void* terms, double softcap,
                                        double temperature, const void* grad_entropy,
                                        cudaStream_t stream);

}  // namespace stablekernels::cuda
