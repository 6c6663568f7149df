// The CUDA kernels of the fused ops (registered for the CUDA dispatch key): argument checks,
// layout, outputs and workspace from torch's caching allocator (so graph capture works),
// launches on torch's current stream. The kernels themselves (csrc/cuda) see no tensor.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/kernels.h"
#include "row_view.h"

namespace stablekernels {
namespace {

cuda::Dtype dtype_of(const char* op, at::ScalarType t) {
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
      TORCH_CHECK(false, op, ": dtype ", t,
                  " is not supported; stablekernels computes in float16, bfloat16, float32 and "
                  "float64");
  }
}

at::ScalarType accumulation_type(at::ScalarType a, at::ScalarType b) {
  return a == at::kDouble || b == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype the kernels write for a requested output: the request itself, or the
// accumulation dtype (converted afterwards: the same single rounding).
at::ScalarType kernel_output_type(at::ScalarType in, at::ScalarType out) {
  return cuda::writes_directly(dtype_of("stablekernels", in), dtype_of("stablekernels", out))
             ? out
             : accumulation_type(in, out);
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op,
              ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

at::Tensor workspace(const Layout& layout, at::ScalarType in, at::ScalarType out,
                     const at::Tensor& like) {
  const size_t bytes =
      cuda::workspace_bytes(layout, dtype_of("stablekernels", in), dtype_of("stablekernels", out));
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor fused_softmax_cuda(const at::Tensor& x, int64_t dim, at::ScalarType dtype, bool log) {
  if (x.dim() == 0) return fused_softmax_cuda(x.reshape({1}), dim, dtype, log).reshape({});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType written = kernel_output_type(x.scalar_type(), dtype);
  const RowView view = row_view(x, dim);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(written));
  if (y.numel() > 0) {
    at::Tensor ws = workspace(view.layout, x.scalar_type(), written, x);
    check_launch(
        cuda::softmax_forward(view.x.const_data_ptr(), dtype_of("fused_softmax", x.scalar_type()),
                              y.mutable_data_ptr(), dtype_of("fused_softmax", written), view.layout,
                              log, ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "fused_softmax");
  }
  return written == dtype ? y : y.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> fused_logsumexp_cuda(const at::Tensor& x, int64_t dim,
                                                        bool keepdim) {
  if (x.dim() == 0) {
    auto [out, lse] = fused_logsumexp_cuda(x.reshape({1}), dim, false);
    return {out.reshape({}), lse.reshape({})};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const RowView view = row_view(x, dim);
  at::Tensor out = at::empty({view.layout.rows()}, x.options());
  at::Tensor lse = at::empty({view.layout.rows()}, x.options().dtype(at::kDouble));
  if (view.layout.n == 0) {
    out.fill_(-std::numeric_limits<double>::infinity());  // an empty sum is 0
    lse.fill_(-std::numeric_limits<double>::infinity());
  } else if (view.layout.rows() > 0) {
    at::Tensor ws = workspace(view.layout, x.scalar_type(), x.scalar_type(), x);
    check_launch(cuda::logsumexp_forward(
                     view.x.const_data_ptr(), dtype_of("fused_logsumexp", x.scalar_type()),
                     out.mutable_data_ptr(), lse.mutable_data_ptr<double>(), view.layout,
                     ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 "fused_logsumexp");
  }
  return {rows_to_result(out, view, keepdim), rows_to_result(lse, view, keepdim)};
}

at::Tensor fused_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& output,
                                       int64_t dim, at::ScalarType input_dtype, bool log) {
  TORCH_CHECK(grad.sizes() == output.sizes(), "fused_softmax_backward: grad has shape ",
              grad.sizes(), ", expected ", output.sizes());
  if (output.dim() == 0) {
    return fused_softmax_backward_cuda(grad.reshape({1}), output.reshape({1}), dim, input_dtype,
                                       log)
        .reshape({});
  }
  const c10::cuda::CUDAGuard guard(output.device());
  const at::ScalarType written = kernel_output_type(output.scalar_type(), input_dtype);
  const RowView view = row_view(output.contiguous(), dim);
  const at::Tensor g = grad.to(output.scalar_type()).contiguous();
  at::Tensor dx = at::empty(output.sizes(), output.options().dtype(written));
  if (dx.numel() > 0) {
    at::Tensor ws = workspace(view.layout, output.scalar_type(), written, output);
    check_launch(
        cuda::softmax_backward(g.const_data_ptr(), view.x.const_data_ptr(),
                               dtype_of("fused_softmax_backward", output.scalar_type()),
                               dx.mutable_data_ptr(), dtype_of("fused_softmax_backward", written),
                               view.layout, log, ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "fused_softmax_backward");
  }
  return written == input_dtype ? dx : dx.to(input_dtype);
}

at::Tensor fused_logsumexp_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& lse, int64_t dim, bool keepdim) {
  if (x.dim() == 0) {
    return fused_logsumexp_backward_cuda(grad.reshape({1}), x.reshape({1}), lse.reshape({1}), 0,
                                         true)
        .reshape({});
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const RowView view = row_view(x, dim);
  const at::Tensor g =
      rows_of(grad, view, keepdim, accumulation_type(x.scalar_type(), x.scalar_type()));
  const at::Tensor l = rows_of(lse, view, keepdim, at::kDouble);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (dx.numel() > 0) {
    check_launch(cuda::logsumexp_backward(
                     g.const_data_ptr(), l.const_data_ptr<double>(), view.x.const_data_ptr(),
                     dtype_of("fused_logsumexp_backward", x.scalar_type()), dx.mutable_data_ptr(),
                     view.layout, c10::cuda::getCurrentCUDAStream()),
                 "fused_logsumexp_backward");
  }
  return dx;
}

std::tuple<at::Tensor, at::Tensor> fused_cross_entropy_cuda(const at::Tensor& logits,
                                                            const at::Tensor& target,
                                                            const c10::optional<at::Tensor>& weight,
                                                            int64_t ignore_index,
                                                            double label_smoothing, double z_loss) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = accumulation_type(logits.scalar_type(), logits.scalar_type());
  const ClassRows in = class_rows("fused_cross_entropy", logits, target, weight, ignore_index, acc);
  at::Tensor loss = at::empty({in.rows}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({in.rows}, logits.options().dtype(at::kDouble));
  if (in.rows > 0 && in.classes > 0) {
    check_launch(
        cuda::cross_entropy_forward(
            in.logits.const_data_ptr(), dtype_of("fused_cross_entropy", logits.scalar_type()),
            in.x_stride, in.target.const_data_ptr<int64_t>(),
            in.weight ? in.weight->const_data_ptr() : nullptr, in.rows, in.classes, ignore_index,
            label_smoothing, z_loss, loss.mutable_data_ptr(), lse.mutable_data_ptr<double>(),
            c10::cuda::getCurrentCUDAStream()),
        "fused_cross_entropy");
  }
  return {loss, lse};
}

at::Tensor fused_cross_entropy_backward_cuda(const at::Tensor& grad_loss,
                                             const at::Tensor& grad_lse, const at::Tensor& logits,
                                             const at::Tensor& target,
                                             const c10::optional<at::Tensor>& weight,
                                             const at::Tensor& lse, int64_t ignore_index,
                                             double label_smoothing, double z_loss) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = accumulation_type(logits.scalar_type(), logits.scalar_type());
  const ClassRows in =
      class_rows("fused_cross_entropy_backward", logits, target, weight, ignore_index, acc);
  // Per-row terms (hi, lo, coef, smooth, one_hot), computed here in fp64 on rows-sized
  // tensors; the kernel is then a pure map over the logits.
  const at::Tensor counted = in.target.ne(ignore_index);
  const at::Tensor t_safe = at::where(counted, in.target, at::zeros_like(in.target));
  const at::Tensor g = at::where(counted, grad_loss.to(at::kDouble), 0.0);
  const at::Tensor w_t =
      in.weight ? in.weight->to(at::kDouble).index_select(0, t_safe) : at::ones_like(g);
  const double classes = static_cast<double>(in.classes);
  const at::Tensor total_w =
      in.weight ? in.weight->to(at::kDouble).sum() : at::full({}, classes, g.options());
  const at::Tensor lse64 = lse.to(at::kDouble);
  const at::Tensor coef =
      g * ((1 - label_smoothing) * w_t + label_smoothing * total_w / classes + 2 * z_loss * lse64) +
      grad_lse.to(at::kDouble);
  const at::Tensor hi = lse64.to(acc);
  const at::Tensor lo = at::where(lse64.isfinite(), lse64 - hi.to(at::kDouble), 0.0);
  const at::Tensor terms = at::stack({hi.to(at::kDouble), lo, coef, label_smoothing / classes * g,
                                      (1 - label_smoothing) * g * w_t},
                                     1)
                               .to(acc)
                               .contiguous();
  at::Tensor dx = at::empty(logits.sizes(), logits.options());
  if (dx.numel() > 0) {
    check_launch(cuda::cross_entropy_backward(
                     in.logits.const_data_ptr(),
                     dtype_of("fused_cross_entropy_backward", logits.scalar_type()), in.x_stride,
                     in.target.const_data_ptr<int64_t>(),
                     in.weight ? in.weight->const_data_ptr() : nullptr, terms.const_data_ptr(),
                     in.rows, in.classes, dx.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 "fused_cross_entropy_backward");
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(stablekernels, CUDA, m) {
  m.impl("fused_softmax", &fused_softmax_cuda);
  m.impl("fused_logsumexp", &fused_logsumexp_cuda);
  m.impl("fused_softmax_backward", &fused_softmax_backward_cuda);
  m.impl("fused_logsumexp_backward", &fused_logsumexp_backward_cuda);
  m.impl("fused_cross_entropy", &fused_cross_entropy_cuda);
  m.impl("fused_cross_entropy_backward", &fused_cross_entropy_backward_cuda);
}

}  // namespace stablekernels
