// From tensors to the row Layout of the kernels (stablekernels/layout.h), shared by the CPU
// and CUDA bindings.
//
// Outputs are contiguous, as torch.softmax's are. The input is read in place when it is
// contiguous, or when it is a batch of contiguous rows at a regular stride (a slice such as
// x[:, :n] along the last dim); any other input (transposed, expanded, ...) is copied to
// contiguous first, since its rows would have to be transposed into the output anyway.
#pragma once

#include <ATen/ATen.h>
#include <stablekernels/layout.h>

namespace stablekernels {

struct RowView {
  at::Tensor x;  // contiguous, or rows at a regular stride (see row_view)
  int64_t dim;   // the reduced dim, wrapped
  Layout layout;
};

// x (at least 1-D) viewed as rows along `dim`.
RowView row_view(const at::Tensor& x, int64_t dim);

// A per-row result tensor (reduced shape, or keepdim shape) as a contiguous tensor of
// `dtype`, in the order the kernels index rows.
at::Tensor rows_of(const at::Tensor& per_row, const RowView& view, bool keepdim,
                   at::ScalarType dtype);

// 2-D logits (rows, classes) as contiguous rows at a regular stride (a copy otherwise),
// checked with their int64 targets and optional class weights (converted to `acc`).
struct ClassRows {
  at::Tensor logits;
  at::Tensor target;
  c10::optional<at::Tensor> weight;
  int64_t rows, classes, x_stride;
};
ClassRows class_rows(const char* op, const at::Tensor& logits, const at::Tensor& target,
                     const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                     at::ScalarType acc);

// The per-row output of a kernel (rows() elements) in the reduced (or keepdim) shape.
at::Tensor rows_to_result(const at::Tensor& rows, const RowView& view, bool keepdim);

}  // namespace stablekernels
