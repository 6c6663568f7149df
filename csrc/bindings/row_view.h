// The arguments of the fused ops, shared by the CPU and CUDA bindings: each op's
// preconditions asserted (once, here, for both devices), and the tensors mapped to the row
// Layout of the kernels (stablekernels/layout.h).
//
// The preconditions are the contract of the ops: the stablekernels router (stablekernels/
// ops/) establishes them (non-empty inputs of at least one dim, dims wrapped, targets in
// range, per-row tensors in the accumulation dtype), so a failed check here is an internal
// error, not a user's: the messages say so.
//
// Outputs are contiguous, as torch.softmax's are. The input is read in place when it is
// contiguous, or when it is a batch of contiguous rows at a regular stride (a slice such as
// x[:, :n] along the last dim); any other input (transposed, expanded, ...) is copied to
// contiguous first, since its rows would have to be transposed into the output anyway.
#pragma once

#include <ATen/ATen.h>
#include <stablekernels/cross_entropy_rows.h>
#include <stablekernels/layout.h>
#include <stablekernels/masked_rows.h>
#include <stablekernels/row_mask.h>

#include <string_view>
#include <vector>

namespace stablekernels {

struct RowView {
  at::Tensor x;  // contiguous, or rows at a regular stride (see above)
  int64_t dim;   // the reduced dim
  Layout layout;
};

// _fused_softmax: x (floating) viewed as rows along dim; dtype floating.
RowView softmax_args(const at::Tensor& x, int64_t dim, at::ScalarType dtype);

// _fused_softmax_backward: the output y as rows along dim (grad has y's shape and dtype, both
// contiguous); input_dtype floating.
RowView softmax_backward_args(const at::Tensor& grad, const at::Tensor& output, int64_t dim,
                              at::ScalarType input_dtype);

// _fused_logsumexp: x as rows along dim.
RowView logsumexp_args(const at::Tensor& x, int64_t dim);

// _fused_logsumexp_backward: x as rows along dim; grad one value per row (flat, x's dtype,
// any stride: 0 for one value for every row), lse the rows' fp64 logsumexp, contiguous.
RowView logsumexp_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lse,
                                int64_t dim);

// A per-row result of the kernels (rows() elements) in the reduced (or keepdim) shape.
at::Tensor rows_to_result(const at::Tensor& rows, const RowView& view, bool keepdim);

// (rows, classes) logits as contiguous rows at a regular stride (a copy otherwise), with
// their int64 targets (in [0, classes)) and optional class weights (classes,) in the
// accumulation dtype of the logits.
struct ClassRows {
  at::Tensor logits;
  at::Tensor target;
  c10::optional<at::Tensor> weight;
  int64_t rows, classes, x_stride;

  const void* weight_data() const { return weight ? weight->const_data_ptr() : nullptr; }
};

// _fused_cross_entropy.
ClassRows cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                             const c10::optional<at::Tensor>& weight);

// _fused_cross_entropy_backward: also terms (rows, 5) in the accumulation dtype, contiguous.
ClassRows cross_entropy_backward_args(const at::Tensor& logits, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight,
                                      const at::Tensor& terms);

// _fused_cross_entropy_loss: the rows and the options shared by every row
// (stablekernels/cross_entropy_rows.h). Targets may be any int64 (a counted target outside
// [0, classes) is the kernels' error to raise); weight, if any, in the accumulation dtype.
struct CrossEntropyCall {
  ClassRows in;
  CrossEntropyOptions options;
  // The backward's gradients as the kernels read them (cross_entropy_loss_backward_args):
  // grad_loss at grad_stride (0: one value for every row), grad_lse (null if None).
  const void* grad = nullptr;
  int64_t grad_stride = 0;
  const double* grad_lse = nullptr;
  int64_t grad_lse_stride = 0;
};

// The forward's outputs, empty: loss ((rows,) for "none", 0-dim otherwise) in the
// accumulation dtype of the logits, lse (rows,) and counts (3,) in float64.
struct CrossEntropyOutputs {
  at::Tensor loss, lse, counts;
};
CrossEntropyOutputs cross_entropy_loss_outputs(const CrossEntropyCall& call,
                                               const at::Tensor& logits);

// torch's reduction names: "none", "mean", "sum".
Reduction reduction_from_name(std::string_view name);

CrossEntropyCall cross_entropy_loss_args(const at::Tensor& logits, const at::Tensor& target,
                                         const c10::optional<at::Tensor>& weight,
                                         int64_t ignore_index, double label_smoothing,
                                         double z_loss, std::string_view reduction);

// _fused_cross_entropy_loss_backward: also grad_loss (accumulation dtype; (rows,) at any
// stride for "none", one element otherwise), grad_lse (None, or (rows,) float64 at any
// stride), lse ((rows,) float64, contiguous) and counts ((3,) float64, contiguous).
CrossEntropyCall cross_entropy_loss_backward_args(
    const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse,
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& counts, int64_t ignore_index, double label_smoothing,
    double z_loss, std::string_view reduction);

// _fused_masked_softmax: x contiguous (rows along the last dim), the mask (if any) of x's
// shape read by its strides, never copied (stablekernels/row_mask.h: its row dims coalesced
// where the mask's strides allow, at most RowMask::kMaxDims of them); mode and masked_rows
// the values of the enums of stablekernels/masked_rows.h.
struct MaskedCall {
  at::Tensor x;
  int64_t rows = 0, n = 0;
  int64_t query_len = 1;  // x.size(-2) (1 for 1-D x): row r is query r % query_len
  RowMask mask;
  MaskedMode mode = MaskedMode::kSoftmax;
  MaskedRows masked_rows = MaskedRows::kZero;

  // y's shape: x's (softmax, log_softmax), (rows,) (logsumexp) or (0,) (statistics).
  std::vector<int64_t> y_shape() const;
};

MaskedCall masked_softmax_args(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                               at::ScalarType dtype, int64_t mode, int64_t masked_rows);

// _fused_masked_softmax_backward: grad and output of one shape and dtype, contiguous, rows
// along the last dim; lse float64, contiguous, (rows,). Returns the rows' count.
int64_t masked_softmax_backward_args(const at::Tensor& grad, const at::Tensor& output,
                                     const at::Tensor& lse, at::ScalarType input_dtype);

}  // namespace stablekernels
