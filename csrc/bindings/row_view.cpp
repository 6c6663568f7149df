#include "row_view.h"

#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

namespace stablekernels {

namespace {

// Ends the message of every failed precondition: the router, not the user, broke it.
constexpr const char* kGuaranteed = " (the stablekernels router guarantees it)";

void expect_floating(const char* op, const char* what, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": expects ", what, " of float16, bfloat16, float32 or float64, got ", t,
              kGuaranteed);
}

// x floating, at least 1-D, with no zero-size dim, and dim in [0, x.dim()).
void expect_rows(const char* op, const char* name, const at::Tensor& x, int64_t dim) {
  expect_floating(op, name, x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.numel() > 0, op, ": expects ", name,
              " with at least one dim and no zero-size dim", kGuaranteed);
  TORCH_CHECK(dim >= 0 && dim < x.dim(), op, ": expects dim in [0, ", x.dim(), "), got ", dim,
              kGuaranteed);
}

// t: contiguous, of `shape` and `dtype`, on x's device.
void expect_alongside(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                      at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.device() == x.device(),
              op, ": expects ", name, " as a contiguous ", dtype, " tensor of shape ", shape,
              " on ", x.device(), ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ",
              t.device(), kGuaranteed);
}

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

// x (checked by expect_rows) as rows along dim.
RowView row_view(const at::Tensor& input, int64_t dim) {
  const int64_t n = input.size(dim);
  if (dim == input.dim() - 1 && !input.is_contiguous() && is_strided_rows(input)) {
    return RowView{input, dim, Layout{input.numel() / n, n, 1, input.stride(dim - 1)}};
  }
  at::Tensor x = input.contiguous();
  int64_t outer = 1, inner = 1;
  for (int64_t k = 0; k < dim; ++k) outer *= x.size(k);
  for (int64_t k = dim + 1; k < x.dim(); ++k) inner *= x.size(k);
  return RowView{x, dim, Layout{outer, n, inner, n * inner}};
}

ClassRows class_rows(const char* op, const at::Tensor& logits, const at::Tensor& target,
                     const c10::optional<at::Tensor>& weight) {
  expect_rows(op, "logits", logits, logits.dim() - 1);
  TORCH_CHECK(logits.dim() == 2, op, ": expects 2-D logits (rows, classes), got shape ",
              logits.sizes(), kGuaranteed);
  const int64_t rows = logits.size(0), classes = logits.size(1);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == rows &&
                  target.device() == logits.device(),
              op, ": expects int64 targets of shape (", rows, ") on ", logits.device(), ", got ",
              target.scalar_type(), " of shape ", target.sizes(), " on ", target.device(),
              kGuaranteed);
  if (weight.has_value()) {
    expect_alongside(op, "weight", *weight, {classes}, at::toOpMathType(logits.scalar_type()),
                     logits);
  }
  const RowView view = row_view(logits, 1);
  return ClassRows{view.x, target.contiguous(), weight, rows, classes, view.layout.x_stride};
}

}  // namespace

RowView softmax_args(const at::Tensor& x, int64_t dim, at::ScalarType dtype) {
  expect_rows("_fused_softmax", "x", x, dim);
  expect_floating("_fused_softmax", "the output dtype", dtype);
  return row_view(x, dim);
}

RowView softmax_backward_args(const at::Tensor& grad, const at::Tensor& output, int64_t dim,
                              at::ScalarType input_dtype) {
  const char* op = "_fused_softmax_backward";
  expect_rows(op, "output", output, dim);
  expect_floating(op, "the input dtype", input_dtype);
  TORCH_CHECK(output.is_contiguous(), op, ": expects a contiguous output", kGuaranteed);
  expect_alongside(op, "grad", grad, output.sizes(), output.scalar_type(), output);
  return row_view(output, dim);
}

RowView logsumexp_args(const at::Tensor& x, int64_t dim) {
  expect_rows("_fused_logsumexp", "x", x, dim);
  return row_view(x, dim);
}

RowView logsumexp_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lse,
                                int64_t dim) {
  const char* op = "_fused_logsumexp_backward";
  expect_rows(op, "x", x, dim);
  const RowView view = row_view(x, dim);
  const int64_t rows = view.layout.rows();
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.dim() == 1 && grad.size(0) == rows &&
                  grad.device() == x.device(),
              op, ": expects grad as ", x.scalar_type(), " of shape (", rows, ") on ", x.device(),
              " (any stride), got ", grad.scalar_type(), " of shape ", grad.sizes(), " on ",
              grad.device(), kGuaranteed);
  expect_alongside(op, "lse", lse, {rows}, at::kDouble, x);
  return view;
}

at::Tensor rows_to_result(const at::Tensor& rows, const RowView& view, bool keepdim) {
  return rows.view(reduced_shape(view.x, view.dim, keepdim));
}

ClassRows cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                             const c10::optional<at::Tensor>& weight) {
  return class_rows("_fused_cross_entropy", logits, target, weight);
}

ClassRows cross_entropy_backward_args(const at::Tensor& logits, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight,
                                      const at::Tensor& terms) {
  const char* op = "_fused_cross_entropy_backward";
  ClassRows in = class_rows(op, logits, target, weight);
  expect_alongside(op, "terms", terms, {in.rows, 5}, at::toOpMathType(logits.scalar_type()),
                   logits);
  return in;
}

Reduction reduction_from_name(std::string_view name) {
  if (name == "none") return Reduction::kNone;
  if (name == "mean") return Reduction::kMean;
  TORCH_CHECK(name == "sum", "cross_entropy: reduction must be 'none', 'mean' or 'sum', got '",
              std::string(name), "'", kGuaranteed);
  return Reduction::kSum;
}

CrossEntropyCall cross_entropy_loss_args(const at::Tensor& logits, const at::Tensor& target,
                                         const c10::optional<at::Tensor>& weight,
                                         int64_t ignore_index, double label_smoothing,
                                         double z_loss, std::string_view reduction) {
  ClassRows in = class_rows("_fused_cross_entropy_loss", logits, target, weight);
  const CrossEntropyOptions options{in.classes, ignore_index, label_smoothing, z_loss,
                                    reduction_from_name(reduction)};
  return {std::move(in), options};
}

CrossEntropyCall cross_entropy_loss_backward_args(
    const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse,
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& counts, int64_t ignore_index, double label_smoothing,
    double z_loss, std::string_view reduction) {
  const char* op = "_fused_cross_entropy_loss_backward";
  CrossEntropyCall call = cross_entropy_loss_args(logits, target, weight, ignore_index,
                                                  label_smoothing, z_loss, reduction);
  const int64_t rows = call.in.rows;
  const bool per_row = call.options.reduction == Reduction::kNone;
  TORCH_CHECK(grad_loss.scalar_type() == at::toOpMathType(logits.scalar_type()) &&
                  grad_loss.device() == logits.device() &&
                  (per_row ? grad_loss.dim() == 1 && grad_loss.size(0) == rows
                           : grad_loss.dim() == 0),
              op, ": expects grad_loss of the accumulation dtype, ",
              per_row ? "(rows,)" : "0-dim", ", got ", grad_loss.scalar_type(), " of shape ",
              grad_loss.sizes(), kGuaranteed);
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->scalar_type() == at::kDouble && grad_lse->dim() == 1 &&
                    grad_lse->size(0) == rows && grad_lse->device() == logits.device(),
                op, ": expects grad_lse as float64 of shape (", rows, "), got ",
                grad_lse->scalar_type(), " of shape ", grad_lse->sizes(), kGuaranteed);
  }
  expect_alongside(op, "lse", lse, {rows}, at::kDouble, logits);
  expect_alongside(op, "counts", counts, {3}, at::kDouble, logits);
  call.grad = grad_loss.const_data_ptr();
  call.grad_stride = per_row ? grad_loss.stride(0) : 0;
  if (grad_lse.has_value()) {
    call.grad_lse = grad_lse->const_data_ptr<double>();
    call.grad_lse_stride = grad_lse->stride(0);
  }
  return call;
}

CrossEntropyOutputs cross_entropy_loss_outputs(const CrossEntropyCall& call,
                                               const at::Tensor& logits) {
  const auto acc = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  const auto doubles = logits.options().dtype(at::kDouble);
  const bool per_row = call.options.reduction == Reduction::kNone;
  return {per_row ? at::empty({call.in.rows}, acc) : at::empty({}, acc),
          at::empty({call.in.rows}, doubles), at::empty({3}, doubles)};
}

std::vector<int64_t> MaskedCall::y_shape() const {
  if (mode == MaskedMode::kLogsumexp) return {rows};
  if (mode == MaskedMode::kStatistics) return {0};
  return x.sizes().vec();
}

MaskedCall masked_softmax_args(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                               at::ScalarType dtype, int64_t mode, int64_t masked_rows) {
  const char* op = "_fused_masked_softmax";
  expect_rows(op, "x", x, x.dim() - 1);
  expect_floating(op, "dtype", dtype);
  TORCH_CHECK(x.is_contiguous(), op, ": expects a contiguous x", kGuaranteed);
  TORCH_CHECK(valid_masked_mode(mode), op, ": expects mode 0, 1, 2 or 3 (MaskedMode), got ", mode,
              kGuaranteed);
  TORCH_CHECK(valid_masked_rows(masked_rows), op, ": expects masked_rows 0 or 1 (MaskedRows), got ",
              masked_rows, kGuaranteed);
  MaskedCall out;
  out.mode = static_cast<MaskedMode>(mode);
  out.masked_rows = static_cast<MaskedRows>(masked_rows);
  out.x = x;
  out.n = x.size(-1);
  out.rows = x.numel() / out.n;
  out.query_len = x.dim() >= 2 ? x.size(-2) : 1;
  if (!mask.has_value()) return out;
  const at::Tensor& m = *mask;
  // The accumulation dtype of reading x and writing dtype: float64 if either is.
  const at::ScalarType acc =
      x.scalar_type() == at::kDouble || dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(m.sizes() == x.sizes() && m.device() == x.device() &&
                  (m.scalar_type() == at::kBool || m.scalar_type() == acc),
              op, ": expects a mask of x's shape ", x.sizes(), " on ", x.device(), ", bool or ",
              acc, ", got ", m.scalar_type(), " of shape ", m.sizes(), " on ", m.device(),
              kGuaranteed);
  out.mask.data = m.const_data_ptr();
  out.mask.additive = m.scalar_type() != at::kBool;
  out.mask.col_stride = m.stride(-1);
  // The leading dims, outermost first, dropping size-1 dims and merging a dim into the next
  // when the mask steps through both as one (stride[d] == stride[d + 1] * size[d + 1]).
  std::vector<int64_t> sizes, strides;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    if (x.size(d) == 1) continue;
    if (!sizes.empty() && strides.back() == m.stride(d) * x.size(d)) {
      sizes.back() *= x.size(d);
      strides.back() = m.stride(d);
    } else {
      sizes.push_back(x.size(d));
      strides.push_back(m.stride(d));
    }
  }
  TORCH_CHECK(static_cast<int>(sizes.size()) <= RowMask::kMaxDims, op, ": a mask with more than ",
              RowMask::kMaxDims,
              " independent leading dims is not supported; make it "
              "contiguous first");
  out.mask.dims = static_cast<int>(sizes.size());
  std::copy(sizes.begin(), sizes.end(), out.mask.sizes);
  std::copy(strides.begin(), strides.end(), out.mask.strides);
  return out;
}

int64_t masked_softmax_backward_args(const at::Tensor& grad, const at::Tensor& output,
                                     const at::Tensor& lse, at::ScalarType input_dtype) {
  const char* op = "_fused_masked_softmax_backward";
  expect_rows(op, "output", output, output.dim() - 1);
  expect_floating(op, "the input dtype", input_dtype);
  TORCH_CHECK(output.is_contiguous(), op, ": expects a contiguous output", kGuaranteed);
  expect_alongside(op, "grad", grad, output.sizes(), output.scalar_type(), output);
  const int64_t rows = output.numel() / output.size(-1);
  expect_alongside(op, "lse", lse, {rows}, at::kDouble, output);
  return rows;
}

}  // namespace stablekernels
