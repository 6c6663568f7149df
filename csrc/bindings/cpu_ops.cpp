// The CPU kernels of the fused ops (registered for the CPU dispatch key): the checked
// arguments and layout (row_view.h), output allocation, then the kernel table of this
// machine's CPU capability.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../cpu/kernels.h"
#include "row_view.h"
#include "tile_args.h"

namespace stablekernels {
namespace {

using cpu::cpu_kernels;

at::Tensor fused_softmax_cpu(const at::Tensor& x, int64_t dim, at::ScalarType dtype, bool log) {
  const RowView view = softmax_args(x, dim, dtype);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(dtype));
  cpu_kernels().softmax_forward(view.x.const_data_ptr(), view.x.scalar_type(), y.mutable_data_ptr(),
                                dtype, view.layout, log);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fused_logsumexp_cpu(const at::Tensor& x, int64_t dim,
                                                       bool keepdim) {
  const RowView view = logsumexp_args(x, dim);
  at::Tensor out = at::empty({view.layout.rows()}, x.options());
  at::Tensor lse = at::empty({view.layout.rows()}, x.options().dtype(at::kDouble));
  cpu_kernels().logsumexp_forward(view.x.const_data_ptr(), view.x.scalar_type(),
                                  out.mutable_data_ptr(), lse.mutable_data_ptr<double>(),
                                  view.layout);
  return {rows_to_result(out, view, keepdim), rows_to_result(lse, view, keepdim)};
}

at::Tensor fused_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& output, int64_t dim,
                                      at::ScalarType input_dtype, bool log) {
  const RowView view = softmax_backward_args(grad, output, dim, input_dtype);
  at::Tensor dx = at::empty(output.sizes(), output.options().dtype(input_dtype));
  cpu_kernels().softmax_backward(grad.const_data_ptr(), view.x.const_data_ptr(),
                                 view.x.scalar_type(), dx.mutable_data_ptr(), input_dtype,
                                 view.layout, log);
  return dx;
}

at::Tensor fused_logsumexp_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& lse, int64_t dim) {
  const RowView view = logsumexp_backward_args(grad, x, lse, dim);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  cpu_kernels().logsumexp_backward(grad.const_data_ptr(), grad.stride(0),
                                   lse.const_data_ptr<double>(), view.x.const_data_ptr(),
                                   view.x.scalar_type(), dx.mutable_data_ptr(), view.layout);
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_cross_entropy_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    bool smoothing) {
  const ClassRows in = cross_entropy_args(logits, target, weight);
  const auto options = logits.options().dtype(at::kDouble);
  at::Tensor nll = at::empty({in.rows}, options);
  at::Tensor smooth = at::empty({in.rows}, options);
  at::Tensor lse = at::empty({in.rows}, options);
  cpu_kernels().cross_entropy_forward(
      in.logits.const_data_ptr(), in.logits.scalar_type(), in.x_stride,
      in.target.const_data_ptr<int64_t>(), in.weight_data(), in.rows, in.classes, smoothing,
      nll.mutable_data_ptr<double>(), smooth.mutable_data_ptr<double>(),
      lse.mutable_data_ptr<double>());
  return {nll, smooth, lse};
}

at::Tensor fused_cross_entropy_backward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                            const c10::optional<at::Tensor>& weight,
                                            const at::Tensor& terms) {
  const ClassRows in = cross_entropy_backward_args(logits, target, weight, terms);
  at::Tensor dx = at::empty_like(logits, at::MemoryFormat::Contiguous);
  cpu_kernels().cross_entropy_backward(in.logits.const_data_ptr(), in.logits.scalar_type(),
                                       in.x_stride, in.target.const_data_ptr<int64_t>(),
                                       in.weight_data(), terms.const_data_ptr(), in.rows,
                                       in.classes, dx.mutable_data_ptr());
  return dx;
}

std::tuple<at::Tensor, at::Tensor> fused_masked_softmax_cpu(const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& mask,
                                                            double scale,
                                                            c10::optional<int64_t> causal_offset,
                                                            at::ScalarType dtype, int64_t mode,
                                                            int64_t masked_rows) {
  const MaskedCall in = masked_softmax_args(x, mask, dtype, mode, masked_rows);
  at::Tensor y = at::empty(in.y_shape(), x.options().dtype(dtype));
  at::Tensor lse = at::empty({in.rows}, x.options().dtype(at::kDouble));
  cpu_kernels().masked_softmax_forward(
      x.const_data_ptr(), x.scalar_type(), y.numel() == 0 ? nullptr : y.mutable_data_ptr(), dtype,
      in.rows, in.n, in.mask, scale, causal_offset.has_value(), in.query_len,
      causal_offset.value_or(0), in.mode, in.masked_rows, lse.mutable_data_ptr<double>());
  return {y, lse};
}

at::Tensor fused_masked_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& output,
                                             const at::Tensor& lse, double scale, bool log,
                                             at::ScalarType input_dtype) {
  const int64_t rows = masked_softmax_backward_args(grad, output, lse, input_dtype);
  at::Tensor dx = at::empty(output.sizes(), output.options().dtype(input_dtype));
  cpu_kernels().masked_softmax_backward(grad.const_data_ptr(), output.const_data_ptr(),
                                        output.scalar_type(), lse.const_data_ptr<double>(),
                                        dx.mutable_data_ptr(), input_dtype, rows, output.size(-1),
                                        scale, log);
  return dx;
}

// dx written over the logits (contiguous rows), which the kernel allows: each element is
// read just before it is written, the target's logit before the row.
void fused_cross_entropy_backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& target,
                                              const c10::optional<at::Tensor>& weight,
                                              const at::Tensor& terms) {
  const ClassRows in = cross_entropy_backward_args(logits, target, weight, terms);
  TORCH_CHECK(in.logits.data_ptr() == logits.data_ptr() && in.x_stride == in.classes,
              "_fused_cross_entropy_backward_inplace: expects contiguous logits (the "
              "stablekernels router guarantees it)");
  cpu_kernels().cross_entropy_backward(in.logits.const_data_ptr(), in.logits.scalar_type(),
                                       in.x_stride, in.target.const_data_ptr<int64_t>(),
                                       in.weight_data(), terms.const_data_ptr(), in.rows,
                                       in.classes, logits.mutable_data_ptr());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_cross_entropy_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, c10::string_view reduction) {
  const CrossEntropyCall call = cross_entropy_loss_args(logits, target, weight, ignore_index,
                                                        label_smoothing, z_loss, reduction);
  const ClassRows& in = call.in;
  CrossEntropyOutputs out = cross_entropy_loss_outputs(call, logits);
  cpu_kernels().cross_entropy_loss(in.logits.const_data_ptr(), in.logits.scalar_type(),
                                   in.x_stride, in.target.const_data_ptr<int64_t>(),
                                   in.weight_data(), in.rows, call.options,
                                   out.loss.mutable_data_ptr(), out.lse.mutable_data_ptr<double>(),
                                   out.counts.mutable_data_ptr<double>());
  return {out.loss, out.lse, out.counts};
}

at::Tensor fused_cross_entropy_loss_backward_cpu(
    const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse,
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& counts, int64_t ignore_index, double label_smoothing,
    double z_loss, c10::string_view reduction) {
  const CrossEntropyCall call =
      cross_entropy_loss_backward_args(grad_loss, grad_lse, logits, target, weight, lse, counts,
                                       ignore_index, label_smoothing, z_loss, reduction);
  const ClassRows& in = call.in;
  at::Tensor dx = at::empty_like(logits, at::MemoryFormat::Contiguous);
  cpu_kernels().cross_entropy_loss_backward(
      call.grad, call.grad_stride, call.grad_lse, call.grad_lse_stride, in.logits.const_data_ptr(),
      in.logits.scalar_type(), in.x_stride, in.target.const_data_ptr<int64_t>(), in.weight_data(),
      lse.const_data_ptr<double>(), counts.const_data_ptr<double>(), in.rows, call.options,
      dx.mutable_data_ptr());
  return dx;
}

void fused_cross_entropy_tile_cpu(const at::Tensor& logits, const at::Tensor& target,
                                  int64_t class_start, const c10::optional<at::Tensor>& weight,
                                  c10::optional<double> softcap, double temperature,
                                  bool smoothing, bool entropy, const at::Tensor& state) {
  const TileCall in = tile_args("_fused_cross_entropy_tile", logits, target, class_start, weight,
                                softcap, temperature, {}, &state);
  cpu_kernels().cross_entropy_tile(logits.const_data_ptr(), logits.scalar_type(), in.rows, in.n,
                                   target.const_data_ptr<int64_t>(), class_start, in.weight,
                                   in.softcap, temperature, smoothing, entropy,
                                   state.mutable_data_ptr<double>());
}

void fused_cross_entropy_tile_backward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                           int64_t class_start,
                                           const c10::optional<at::Tensor>& weight,
                                           const at::Tensor& terms, c10::optional<double> softcap,
                                           double temperature,
                                           const c10::optional<at::Tensor>& grad_entropy) {
  const TileCall in =
      grad_entropy ? tile_args("_fused_cross_entropy_tile_backward", logits, target, class_start,
                               weight, softcap, temperature, {{&terms, 5}, {&*grad_entropy, 0}},
                               nullptr)
                   : tile_args("_fused_cross_entropy_tile_backward", logits, target, class_start,
                               weight, softcap, temperature, {{&terms, 5}}, nullptr);
  cpu_kernels().cross_entropy_tile_backward(
      logits.mutable_data_ptr(), logits.scalar_type(), in.rows, in.n,
      target.const_data_ptr<int64_t>(), class_start, in.weight, terms.const_data_ptr(), in.softcap,
      temperature, grad_entropy ? grad_entropy->const_data_ptr() : nullptr);
}

std::string cpu_capability() { return cpu_kernels().capability; }

}  // namespace

TORCH_LIBRARY_IMPL(stablekernels, CPU, m) {
  m.impl("_fused_softmax", &fused_softmax_cpu);
  m.impl("_fused_logsumexp", &fused_logsumexp_cpu);
  m.impl("_fused_softmax_backward", &fused_softmax_backward_cpu);
  m.impl("_fused_logsumexp_backward", &fused_logsumexp_backward_cpu);
  m.impl("_fused_cross_entropy", &fused_cross_entropy_cpu);
  m.impl("_fused_cross_entropy_backward", &fused_cross_entropy_backward_cpu);
  m.impl("_fused_masked_softmax", &fused_masked_softmax_cpu);
  m.impl("_fused_masked_softmax_backward", &fused_masked_softmax_backward_cpu);
  m.impl("_fused_cross_entropy_backward_inplace", &fused_cross_entropy_backward_inplace_cpu);
  m.impl("_fused_cross_entropy_loss", &fused_cross_entropy_loss_cpu);
  m.impl("_fused_cross_entropy_loss_backward", &fused_cross_entropy_loss_backward_cpu);
  m.impl("_fused_cross_entropy_tile", &fused_cross_entropy_tile_cpu);
  m.impl("_fused_cross_entropy_tile_backward", &fused_cross_entropy_tile_backward_cpu);
}

TORCH_LIBRARY_FRAGMENT(stablekernels, m) {
  // The capability whose kernel table runs here (DEFAULT, AVX2 or AVX512).
  m.def("_fused_cpu_capability() -> str", &cpu_capability);
}

}  // namespace stablekernels
