#include "row_view.h"

namespace stablekernels {

namespace {

std::vector<int64_t> reduced_shape(const at::Tensor& x, int64_t dim, bool keepdim) {
  std::vector<int64_t> shape = x.sizes().vec();
  if (keepdim) {
    shape[dim] = 1;
  } else {
    shape.erase(shape.begin() + dim);
  }
  return shape;
}

// True if x is rows of its last dim, contiguous, at one regular stride between rows (the
// leading dims contiguous among themselves): x[..., a:b] of a contiguous tensor.
bool is_strided_rows(const at::Tensor& x) {
  const int64_t d = x.dim();
  if (d < 2 || x.stride(d - 1) != 1 || x.stride(d - 2) < x.size(d - 1)) return false;
  for (int64_t k = d - 3; k >= 0; --k) {
    if (x.size(k) != 1 && x.stride(k) != x.stride(k + 1) * x.size(k + 1)) return false;
  }
  return true;
}

}  // namespace

RowView row_view(const at::Tensor& input, int64_t dim) {
  TORCH_CHECK(input.dim() >= 1, "stablekernels: expected a tensor with at least one dim");
  dim = at::maybe_wrap_dim(dim, input.dim());
  const int64_t n = input.size(dim);
  if (dim == input.dim() - 1 && !input.is_contiguous() && is_strided_rows(input)) {
    const int64_t outer = n == 0 ? 0 : input.numel() / n;
    return RowView{input, dim, Layout{outer, n, 1, input.stride(dim - 1)}};
  }
  at::Tensor x = input.contiguous();
  int64_t outer = 1, inner = 1;
  for (int64_t k = 0; k < dim; ++k) outer *= x.size(k);
  for (int64_t k = dim + 1; k < x.dim(); ++k) inner *= x.size(k);
  return RowView{x, dim, Layout{outer, n, inner, n * inner}};
}

at::Tensor rows_of(const at::Tensor& per_row, const RowView& view, bool keepdim,
                   at::ScalarType dtype) {
  const auto expected = reduced_shape(view.x, view.dim, keepdim);
  TORCH_CHECK(per_row.sizes().vec() == expected, "stablekernels: per-row tensor has shape ",
              per_row.sizes(), ", expected ", at::IntArrayRef(expected), " for input ",
              view.x.sizes(), " along dim ", view.dim);
  return per_row.to(dtype).contiguous();
}

at::Tensor rows_to_result(const at::Tensor& rows, const RowView& view, bool keepdim) {
  return rows.view(reduced_shape(view.x, view.dim, keepdim));
}

ClassRows class_rows(const char* op, const at::Tensor& logits, const at::Tensor& target,
                     const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                     at::ScalarType acc) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got ", logits.sizes());
  TORCH_CHECK(
      target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == logits.size(0),
      op, ": target must be int64 of shape (", logits.size(0), "), got ", target.scalar_type(), " ",
      target.sizes());
  if (target.device().is_cpu() && target.numel() > 0) {
    // The kernels index the logits by target: refuse any target out of range (the Python
    // API checks first, with torch's IndexError; this guards direct calls of the op).
    const auto bad = (target.lt(0) | target.ge(logits.size(1))) & target.ne(ignore_index);
    TORCH_CHECK(!bad.any().item<bool>(), op, ": a target is out of bounds for ", logits.size(1),
                " classes");
  }
  const RowView view = row_view(logits, 1);
  ClassRows out{view.x,         target.contiguous(), c10::nullopt,
                logits.size(0), logits.size(1),      view.layout.x_stride};
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1), op,
                ": weight must have shape (", logits.size(1), "), got ", weight->sizes());
    out.weight = weight->to(acc).contiguous();
  }
  return out;
}

}  // namespace stablekernels
