// The CUDA kernels of the fused ops (registered for the CUDA dispatch key): the checked
// arguments and layout (row_view.h), outputs and workspace from torch's caching allocator (so
// graph capture works), launches on torch's current stream. The kernels themselves
// (csrc/cuda) see no tensor.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../cuda/kernels.h"
#include "row_view.h"
#include "tile_args.h"

namespace stablekernels {
namespace {

// The kernels' name of a dtype (the arguments' checks admit only these four).
cuda::Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::Dtype::kFloat32;
    case at::kDouble:
      return cuda::Dtype::kFloat64;
    case at::kHalf:
      return cuda::Dtype::kFloat16;
    case at::kBFloat16:
      return cuda::Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "stablekernels: no CUDA kernels for dtype ", t);
  }
}

// The dtype the kernels write for a requested output: the request itself, or the
// accumulation dtype (converted afterwards: the same single rounding).
at::ScalarType kernel_output_type(at::ScalarType in, at::ScalarType out) {
  return cuda::writes_directly(dtype_of(in), dtype_of(out))
             ? out
             : at::promote_types(at::toOpMathType(in), at::toOpMathType(out));
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op,
              ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

at::Tensor workspace(const Layout& layout, at::ScalarType in, at::ScalarType out,
                     const at::Tensor& like) {
  const size_t bytes = cuda::workspace_bytes(layout, dtype_of(in), dtype_of(out));
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor fused_softmax_cuda(const at::Tensor& x, int64_t dim, at::ScalarType dtype, bool log) {
  const RowView view = softmax_args(x, dim, dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType written = kernel_output_type(x.scalar_type(), dtype);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(written));
  at::Tensor ws = workspace(view.layout, x.scalar_type(), written, x);
  check_launch(cuda::softmax_forward(view.x.const_data_ptr(), dtype_of(x.scalar_type()),
                                     y.mutable_data_ptr(), dtype_of(written), view.layout, log,
                                     ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "_fused_softmax");
  return written == dtype ? y : y.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> fused_logsumexp_cuda(const at::Tensor& x, int64_t dim,
                                                        bool keepdim) {
  const RowView view = logsumexp_args(x, dim);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({view.layout.rows()}, x.options());
  at::Tensor lse = at::empty({view.layout.rows()}, x.options().dtype(at::kDouble));
  at::Tensor ws = workspace(view.layout, x.scalar_type(), x.scalar_type(), x);
  check_launch(
      cuda::logsumexp_forward(view.x.const_data_ptr(), dtype_of(x.scalar_type()),
                              out.mutable_data_ptr(), lse.mutable_data_ptr<double>(), view.layout,
                              ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
      "_fused_logsumexp");
  return {rows_to_result(out, view, keepdim), rows_to_result(lse, view, keepdim)};
}

at::Tensor fused_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& output,
                                       int64_t dim, at::ScalarType input_dtype, bool log) {
  const RowView view = softmax_backward_args(grad, output, dim, input_dtype);
  const c10::cuda::CUDAGuard guard(output.device());
  const at::ScalarType written = kernel_output_type(output.scalar_type(), input_dtype);
  at::Tensor dx = at::empty(output.sizes(), output.options().dtype(written));
  at::Tensor ws = workspace(view.layout, output.scalar_type(), written, output);
  check_launch(cuda::softmax_backward(grad.const_data_ptr(), view.x.const_data_ptr(),
                                      dtype_of(output.scalar_type()), dx.mutable_data_ptr(),
                                      dtype_of(written), view.layout, log, ws.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream()),
               "_fused_softmax_backward");
  return written == input_dtype ? dx : dx.to(input_dtype);
}

at::Tensor fused_logsumexp_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& lse, int64_t dim) {
  const RowView view = logsumexp_backward_args(grad, x, lse, dim);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  check_launch(cuda::logsumexp_backward(grad.const_data_ptr(), grad.stride(0),
                                        lse.const_data_ptr<double>(), view.x.const_data_ptr(),
                                        dtype_of(x.scalar_type()), dx.mutable_data_ptr(),
                                        view.layout, c10::cuda::getCurrentCUDAStream()),
               "_fused_logsumexp_backward");
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_cross_entropy_cuda(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    bool smoothing) {
  const ClassRows in = cross_entropy_args(logits, target, weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto options = logits.options().dtype(at::kDouble);
  at::Tensor nll = at::empty({in.rows}, options);
  at::Tensor smooth = at::empty({in.rows}, options);
  at::Tensor lse = at::empty({in.rows}, options);
  check_launch(cuda::cross_entropy_forward(
                   in.logits.const_data_ptr(), dtype_of(logits.scalar_type()), in.x_stride,
                   in.target.const_data_ptr<int64_t>(), in.weight_data(), in.rows, in.classes,
                   smoothing, nll.mutable_data_ptr<double>(), smooth.mutable_data_ptr<double>(),
                   lse.mutable_data_ptr<double>(), c10::cuda::getCurrentCUDAStream()),
               "_fused_cross_entropy");
  return {nll, smooth, lse};
}

at::Tensor fused_cross_entropy_backward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                             const c10::optional<at::Tensor>& weight,
                                             const at::Tensor& terms) {
  const ClassRows in = cross_entropy_backward_args(logits, target, weight, terms);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor dx = at::empty(logits.sizes(), logits.options());
  check_launch(cuda::cross_entropy_backward(
                   in.logits.const_data_ptr(), dtype_of(logits.scalar_type()), in.x_stride,
                   in.target.const_data_ptr<int64_t>(), in.weight_data(), terms.const_data_ptr(),
                   in.rows, in.classes, dx.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "_fused_cross_entropy_backward");
  return dx;
}

// The loss in one call (cross_entropy_loss_forward): lse and counts float64; loss in the
// accumulation dtype, (rows,) for "none", 0-dim otherwise, and for those a float64 scratch of
// the rows' totals. For "none" counts[0] and counts[1] are 0, and counts[2] is 0 without
// label smoothing (kernels.h: the backward reads none of them then).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_cross_entropy_loss_cuda(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, c10::string_view reduction) {
  const CrossEntropyCall call = cross_entropy_loss_args(logits, target, weight, ignore_index,
                                                        label_smoothing, z_loss, reduction);
  const ClassRows& in = call.in;
  const c10::cuda::CUDAGuard guard(logits.device());
  CrossEntropyOutputs out = cross_entropy_loss_outputs(call, logits);
  at::Tensor &loss = out.loss, &lse = out.lse, &counts = out.counts;
  const int64_t scratch_size = cuda::cross_entropy_loss_scratch(in.rows, call.options.reduction);
  at::Tensor scratch = at::empty({scratch_size}, logits.options().dtype(at::kDouble));
  check_launch(cuda::cross_entropy_loss_forward(
                   in.logits.const_data_ptr(), dtype_of(logits.scalar_type()), in.x_stride,
                   in.target.const_data_ptr<int64_t>(), in.weight_data(), in.rows, call.options,
                   loss.mutable_data_ptr(), lse.mutable_data_ptr<double>(),
                   counts.mutable_data_ptr<double>(),
                   scratch_size > 0 ? scratch.mutable_data_ptr<double>() : nullptr,
                   c10::cuda::getCurrentCUDAStream()),
               "_fused_cross_entropy_loss");
  return {loss, lse, counts};
}

// dx of the loss (cross_entropy_loss_backward): contiguous, of the logits' dtype and shape.
at::Tensor fused_cross_entropy_loss_backward_cuda(
    const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse,
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& counts, int64_t ignore_index, double label_smoothing,
    double z_loss, c10::string_view reduction) {
  const CrossEntropyCall call =
      cross_entropy_loss_backward_args(grad_loss, grad_lse, logits, target, weight, lse, counts,
                                       ignore_index, label_smoothing, z_loss, reduction);
  const ClassRows& in = call.in;
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor dx = at::empty(logits.sizes(), logits.options());
  check_launch(cuda::cross_entropy_loss_backward(
                   call.grad, call.grad_stride, call.grad_lse, call.grad_lse_stride,
                   in.logits.const_data_ptr(),
                   dtype_of(logits.scalar_type()), in.x_stride, in.target.const_data_ptr<int64_t>(),
                   in.weight_data(), lse.const_data_ptr<double>(), counts.const_data_ptr<double>(),
                   in.rows, call.options, dx.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "_fused_cross_entropy_loss_backward");
  return dx;
}

// The mask is read in place by its strides (masked_softmax_args coalesces its row dims); y is
// written in `dtype` directly or, for the pairs the kernels do not write (fp32 -> fp16, say),
// in the accumulation dtype and converted (one rounding, as _fused_softmax). The statistics
// mode computes lse only: y is an empty (0,) tensor; the logsumexp mode writes y (rows,).
std::tuple<at::Tensor, at::Tensor> fused_masked_softmax_cuda(const at::Tensor& x,
                                                             const c10::optional<at::Tensor>& mask,
                                                             double scale,
                                                             c10::optional<int64_t> causal_offset,
                                                             at::ScalarType dtype, int64_t mode,
                                                             int64_t masked_rows) {
  const MaskedCall in = masked_softmax_args(x, mask, dtype, mode, masked_rows);
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernels' y dtype; its accumulation dtype is the mask's (fp64 if x or dtype is).
  const at::ScalarType written = kernel_output_type(x.scalar_type(), dtype);
  const bool statistics = in.mode == MaskedMode::kStatistics;
  at::Tensor y = at::empty(in.y_shape(), x.options().dtype(statistics ? dtype : written));
  at::Tensor lse = at::empty({in.rows}, x.options().dtype(at::kDouble));
  check_launch(cuda::masked_softmax_forward(
                   in.x.const_data_ptr(), dtype_of(x.scalar_type()),
                   statistics ? nullptr : y.mutable_data_ptr(), dtype_of(written), in.rows, in.n,
                   in.mask, scale, causal_offset.has_value(), in.query_len,
                   causal_offset.value_or(0), in.mode, in.masked_rows,
                   lse.mutable_data_ptr<double>(), c10::cuda::getCurrentCUDAStream()),
               "_fused_masked_softmax");
  if (!statistics && written != dtype) y = y.to(dtype);
  return {y, lse};
}

// The linear cross-entropy's tile epilogues (linear_tiles.cu): state and the tile are
// written in place, on the current stream; no allocation, no synchronisation.
void fused_cross_entropy_tile_cuda(const at::Tensor& logits, const at::Tensor& target,
                                   int64_t class_start, const c10::optional<at::Tensor>& weight,
                                   c10::optional<double> softcap, double temperature,
                                   bool smoothing, bool entropy, const at::Tensor& state) {
  const TileCall in = tile_args("_fused_cross_entropy_tile", logits, target, class_start, weight,
                                softcap, temperature, {}, &state);
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(cuda::cross_entropy_tile_forward(
                   logits.const_data_ptr(), dtype_of(logits.scalar_type()), in.rows, in.n,
                   target.const_data_ptr<int64_t>(), class_start, in.weight, in.softcap,
                   temperature, smoothing, entropy, state.mutable_data_ptr<double>(),
                   c10::cuda::getCurrentCUDAStream()),
               "_fused_cross_entropy_tile");
}

void fused_cross_entropy_tile_backward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                            int64_t class_start,
                                            const c10::optional<at::Tensor>& weight,
                                            const at::Tensor& terms,
                                            c10::optional<double> softcap, double temperature,
                                            const c10::optional<at::Tensor>& grad_entropy) {
  const char* op = "_fused_cross_entropy_tile_backward";
  const TileCall in =
      grad_entropy ? tile_args(op, logits, target, class_start, weight, softcap, temperature,
                               {{&terms, 5}, {&*grad_entropy, 0}}, nullptr)
                   : tile_args(op, logits, target, class_start, weight, softcap, temperature,
                               {{&terms, 5}}, nullptr);
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(cuda::cross_entropy_tile_backward(
                   logits.mutable_data_ptr(), dtype_of(logits.scalar_type()), in.rows, in.n,
                   target.const_data_ptr<int64_t>(), class_start, in.weight,
                   terms.const_data_ptr(), in.softcap, temperature,
                   grad_entropy ? grad_entropy->const_data_ptr() : nullptr,
                   c10::cuda::getCurrentCUDAStream()),
               op);
}

// dx in input_dtype directly or, for the pairs the kernels do not write, in the accumulation
// dtype and converted (as _fused_softmax_backward).
at::Tensor fused_masked_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& output,
                                              const at::Tensor& lse, double scale, bool log,
                                              at::ScalarType input_dtype) {
  const int64_t rows = masked_softmax_backward_args(grad, output, lse, input_dtype);
  const c10::cuda::CUDAGuard guard(output.device());
  const at::ScalarType written = kernel_output_type(output.scalar_type(), input_dtype);
  at::Tensor dx = at::empty(output.sizes(), output.options().dtype(written));
  check_launch(cuda::masked_softmax_backward(
                   grad.const_data_ptr(), output.const_data_ptr(), dtype_of(output.scalar_type()),
                   lse.const_data_ptr<double>(), dx.mutable_data_ptr(), dtype_of(written), rows,
                   output.size(-1), scale, log, c10::cuda::getCurrentCUDAStream()),
               "_fused_masked_softmax_backward");
  return written == input_dtype ? dx : dx.to(input_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(stablekernels, CUDA, m) {
  m.impl("_fused_softmax", &fused_softmax_cuda);
  m.impl("_fused_logsumexp", &fused_logsumexp_cuda);
  m.impl("_fused_softmax_backward", &fused_softmax_backward_cuda);
  m.impl("_fused_logsumexp_backward", &fused_logsumexp_backward_cuda);
  m.impl("_fused_cross_entropy", &fused_cross_entropy_cuda);
  m.impl("_fused_cross_entropy_backward", &fused_cross_entropy_backward_cuda);
  m.impl("_fused_cross_entropy_loss", &fused_cross_entropy_loss_cuda);
  m.impl("_fused_cross_entropy_loss_backward", &fused_cross_entropy_loss_backward_cuda);
  m.impl("_fused_masked_softmax", &fused_masked_softmax_cuda);
  m.impl("_fused_cross_entropy_tile", &fused_cross_entropy_tile_cuda);
  m.impl("_fused_cross_entropy_tile_backward", &fused_cross_entropy_tile_backward_cuda);
  m.impl("_fused_masked_softmax_backward", &fused_masked_softmax_backward_cuda);
}

}  // namespace stablekernels
