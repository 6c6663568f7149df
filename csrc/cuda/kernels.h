// The CUDA kernels' interface: raw pointers, the row Layout, a stream. No torch header, so
// nvcc compiles the kernels on any machine (CI has nvcc but no GPU and a CPU-only torch).
//
// Every launcher runs on `stream` and allocates nothing: the split path of long rows takes
// a workspace from the caller (workspace_bytes), so the kernels are safe under CUDA graph
// capture. Offsets are 64-bit.
#pragma once

#include <cuda_runtime.h>
#include <stablekernels/layout.h>
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

// dx = grad[r] * exp((x - hi[r]) - lo[r]), a pure map: grad, hi and lo one value per row, in
// the accumulation dtype of x (hi + lo is the fp64 lse, split by the caller); dx contiguous,
// of x's dtype.
cudaError_t logsumexp_backward(const void* grad, const void* hi, const void* lo, const void* x,
                               Dtype x_type, void* dx, const Layout& layout, cudaStream_t stream);

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

using stablekernels::RowMask;  // stablekernels/row_mask.h

// Masked softmax of `rows` contiguous rows of n elements of x (row r at x + r * n), in the
// accumulation dtype A of (x_type, y_type): t_j = scale * x_j (+ mask_j if additive); -inf
// where a bool mask is false or, if `causal`, where j > (r % query_len) + causal_offset (the
// elements past that limit are neither read nor exponentiated). mode 0: y = softmax of t,
// 1: log_softmax; y contiguous, of y_type (writes_directly(x_type, y_type) must hold), 0 /
// -inf where dropped; a row with every t_j = -inf ("dead") 0 / -inf throughout, a row with a
// NaN or a +inf t NaN throughout. mode 2: y unused (may be null), lse only. lse[r] (fp64) =
// m + log1p(s') of row r: -inf for a dead row, NaN for a NaN row, +inf for a row with +inf.
// Rows of up to 8192 elements are held in registers (a group of 4 to 512 threads per row);
// longer rows are walked by one block of 512 threads, which reads x (and the mask) twice.
// No workspace.
cudaError_t masked_softmax_forward(const void* x, Dtype x_type, void* y, Dtype y_type, int64_t rows,
                                   int64_t n, const RowMask& mask, double scale, bool causal,
                                   int64_t query_len, int64_t causal_offset, int mode, double* lse,
                                   cudaStream_t stream);

}  // namespace stablekernels::cuda
