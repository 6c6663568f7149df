// The fused kernel ops of the compiled extension, defined once here; CPU kernels register
// in cpu_ops.cpp and CUDA kernels in cuda_ops.cpp under these names. They are private: the
// stablekernels routers (stablekernels/ops/) call them through the `cpp` and `cuda`
// backends with their preconditions established (inputs non-empty and at least 1-D, dims
// wrapped, targets in range, per-row tensors in the accumulation dtype: float64 for float64
// inputs, else float32), which the bindings only assert (row_view.h).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(stablekernels, m) {
  // softmax(x) along dim (log_softmax if `log`), contiguous, in `dtype`.
  m.def("_fused_softmax(Tensor x, int dim, ScalarType dtype, bool log) -> Tensor");
  // (logsumexp in x's dtype, logsumexp in float64), both of the reduced (or keepdim) shape.
  m.def("_fused_logsumexp(Tensor x, int dim, bool keepdim) -> (Tensor, Tensor)");
  // grad and output of one shape and dtype, contiguous; dx in input_dtype.
  m.def(
      "_fused_softmax_backward(Tensor grad, Tensor output, int dim, ScalarType input_dtype, "
      "bool log) -> Tensor");
  // dx = grad[r] * exp(x - lse[r]) (taken as (x - hi) - lo, hi + lo = lse: split_lse); grad:
  // one value per row (row o * inner + i) of x's dtype, flat at any stride; lse: float64,
  // contiguous.
  m.def("_fused_logsumexp_backward(Tensor grad, Tensor x, Tensor lse, int dim) -> Tensor");
  // Per row of (rows, classes) logits with int64 targets, float64: (nll, smooth, lse) with
  // nll = (m - x_t) + log1p(s'), smooth = sum_c w_c (m - x_c) + W log1p(s') if `smoothing`
  // (else 0), lse = logsumexp.
  m.def(
      "_fused_cross_entropy(Tensor logits, Tensor target, Tensor? weight, bool smoothing) "
      "-> (Tensor, Tensor, Tensor)");
  // dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c - [c == t] * one_hot, with terms
  // (rows, 5) = (hi, lo, coef, smooth, one_hot) in the accumulation dtype.
  m.def(
      "_fused_cross_entropy_backward(Tensor logits, Tensor target, Tensor? weight, "
      "Tensor terms) -> Tensor");
  // Cross-entropy's loss in one call: the pieces of each row and their epilogue, the
  // reduction included (stablekernels/cross_entropy_rows.h). Any int64 targets (a counted one
  // outside [0, classes) raises); weight None or (classes,) in the accumulation dtype.
  // -> (loss: (rows,) for "none", 0-dim otherwise, in the accumulation dtype; lse (rows,)
  // float64; counts (3,) float64 = (sum of counted w_t, counted rows, W)).
  m.def(
      "_fused_cross_entropy_loss(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, str reduction) -> (Tensor, Tensor, Tensor)");
  // dx of _fused_cross_entropy_loss from the loss's gradient (accumulation dtype, (rows,) at
  // any stride for "none", 0-dim otherwise), the lse output's gradient (None or (rows,)
  // float64) and the forward's lse and counts; contiguous, of the logits' dtype.
  m.def(
      "_fused_cross_entropy_loss_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, "
      "Tensor target, Tensor? weight, Tensor lse, Tensor counts, int ignore_index, "
      "float label_smoothing, float z_loss, str reduction) -> Tensor");
  // Masked softmax along the last dim of x (contiguous, >= 1-D, non-empty), rows r:
  //   t_j = scale * x_j (in the accumulation dtype) + mask_j (an additive mask), or -inf where
  //   a bool mask is False or (causal_offset given) j > i + causal_offset, i = r % x.size(-2)
  //   (0 for 1-D x). mask: None or x's shape (an expanded view: any strides), bool (True
  //   keeps) or of the accumulation dtype. mode (MaskedMode, stablekernels/masked_rows.h):
  //   0 softmax, 1 log_softmax (y in `dtype`, x's shape; 0 / -inf where dropped), 2
  //   statistics only (y empty, (0,)), 3 logsumexp (y (rows,) in `dtype`). A row with every
  //   t_j = -inf ("dead") gives 0 / -inf / -inf, or NaN for masked_rows 1 (MaskedRows::kNan;
  //   0 is kZero). lse: float64 per row, m + log1p(s') over the row, -inf for a dead row.
  m.def(
      "_fused_masked_softmax(Tensor x, Tensor? mask, float scale, int? causal_offset, "
      "ScalarType dtype, int mode, int masked_rows) -> (Tensor, Tensor)");
  // dx of _fused_masked_softmax (softmax, or log_softmax if `log`) from grad and output (one
  // shape and dtype, contiguous) and its lse ((rows,) float64): per row, 0 where lse is -inf,
  // else scale * the plain backward (log_softmax: 0 where output is -inf); in input_dtype.
  m.def(
      "_fused_masked_softmax_backward(Tensor grad, Tensor output, Tensor lse, float scale, "
      "bool log, ScalarType input_dtype) -> Tensor");
  // The same dx written over the logits (contiguous), for a caller done with them: the
  // linear cross-entropy turns a chunk of logits into its gradient without a second buffer.
  m.def(
      "_fused_cross_entropy_backward_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, "
      "Tensor terms) -> ()");
  // The linear cross-entropy's tile epilogues (stablekernels/linear_tiles.h): logits the raw
  // (rows, n) tile x W_k^T + b_k of classes [class_start, class_start + n), fp32 or fp64,
  // contiguous; target (rows,) int64 (the tile holds those in its range); weight None or the
  // (V,) class weights of the logits' dtype. The forward merges each row into state (rows, 10)
  // float64 (class_start 0 initialises it; columns 6 to 9 are then (nll, smooth, lse,
  // entropy)); the backward overwrites logits with the gradient along them, from terms
  // (rows, 5) = (hi, lo, coef, smooth, one_hot) and grad_entropy (rows,) or None.
  m.def(
      "_fused_cross_entropy_tile(Tensor logits, Tensor target, int class_start, Tensor? weight, "
      "float? softcap, float temperature, bool smoothing, bool entropy, Tensor(a!) state) -> ()");
  m.def(
      "_fused_cross_entropy_tile_backward(Tensor(a!) logits, Tensor target, int class_start, "
      "Tensor? weight, Tensor terms, float? softcap, float temperature, Tensor? grad_entropy) "
      "-> ()");
}
