// The CPU kernels of the fused ops (registered for the CPU dispatch key): argument checks,
// layout, output allocation, then the kernel table of this machine's CPU capability.
#include <torch/library.h>

#include "../cpu/kernels.h"
#include "row_view.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <cstdint>

namespace stablekernels {
namespace {

using cpu::cpu_kernels;

// A new CPU tensor for a kernel to write. Large ones are advised onto transparent huge pages
// (Linux, THP in "madvise" mode): the first write into fresh memory otherwise takes a page
// fault every 4 KiB, which costs more than the kernel itself for outputs of 32 MiB and up
// (128 MiB here: 39 ms to allocate and fill on 4 KiB pages, 8 ms on 2 MiB pages). Advice
// only: where THP is off, or the memory was touched before, nothing changes.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like) {
  at::Tensor t = at::empty(sizes, like.options().dtype(dtype));
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes >= 2 * kHugePage) {
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

void check_floating(const char* op, const char* what, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op, ": ",
              what, " has dtype ", t,
              "; stablekernels computes in float16, bfloat16, float32 and float64");
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor fused_softmax_cpu(const at::Tensor& x, int64_t dim, at::ScalarType dtype, bool log) {
  check_floating("fused_softmax", "the input", x.scalar_type());
  check_floating("fused_softmax", "the output dtype", dtype);
  if (x.dim() == 0) return fused_softmax_cpu(x.reshape({1}), dim, dtype, log).reshape({});
  const RowView view = row_view(x, dim);
  at::Tensor y = empty_output(x.sizes(), dtype, x);
  if (y.numel() > 0) {
    cpu_kernels().softmax_forward(view.x.const_data_ptr(), view.x.scalar_type(),
                                  y.mutable_data_ptr(), dtype, view.layout, log);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> fused_logsumexp_cpu(const at::Tensor& x, int64_t dim,
                                                       bool keepdim) {
  check_floating("fused_logsumexp", "the input", x.scalar_type());
  if (x.dim() == 0) {
    auto [out, lse] = fused_logsumexp_cpu(x.reshape({1}), dim, false);
    return {out.reshape({}), lse.reshape({})};
  }
  const RowView view = row_view(x, dim);
  at::Tensor out = at::empty({view.layout.rows()}, x.options());
  at::Tensor lse = at::empty({view.layout.rows()}, x.options().dtype(at::kDouble));
  if (view.layout.n == 0) {
    out.fill_(-std::numeric_limits<double>::infinity());  // an empty sum is 0
    lse.fill_(-std::numeric_limits<double>::infinity());
  } else if (view.layout.rows() > 0) {
    cpu_kernels().logsumexp_forward(view.x.const_data_ptr(), view.x.scalar_type(),
                                    out.mutable_data_ptr(), lse.mutable_data_ptr<double>(),
                                    view.layout);
  }
  return {rows_to_result(out, view, keepdim), rows_to_result(lse, view, keepdim)};
}

at::Tensor fused_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& output, int64_t dim,
                                      at::ScalarType input_dtype, bool log) {
  check_floating("fused_softmax_backward", "the output", output.scalar_type());
  check_floating("fused_softmax_backward", "the input dtype", input_dtype);
  TORCH_CHECK(grad.sizes() == output.sizes(), "fused_softmax_backward: grad has shape ",
              grad.sizes(), ", expected ", output.sizes());
  if (output.dim() == 0) {
    return fused_softmax_backward_cpu(grad.reshape({1}), output.reshape({1}), dim, input_dtype, log)
        .reshape({});
  }
  // y and grad contiguous, in y's dtype (autograd hands over expanded grads, e.g. of sum()).
  const RowView view = row_view(output.contiguous(), dim);
  const at::Tensor g = grad.to(output.scalar_type()).contiguous();
  at::Tensor dx = empty_output(output.sizes(), input_dtype, output);
  if (dx.numel() > 0) {
    cpu_kernels().softmax_backward(g.const_data_ptr(), view.x.const_data_ptr(),
                                   view.x.scalar_type(), dx.mutable_data_ptr(), input_dtype,
                                   view.layout, log);
  }
  return dx;
}

at::Tensor fused_logsumexp_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& lse, int64_t dim, bool keepdim) {
  check_floating("fused_logsumexp_backward", "the input", x.scalar_type());
  if (x.dim() == 0) {
    return fused_logsumexp_backward_cpu(grad.reshape({1}), x.reshape({1}), lse.reshape({1}), 0,
                                        true)
        .reshape({});
  }
  const RowView view = row_view(x, dim);
  const auto acc = accumulation_type(x.scalar_type());
  const at::Tensor g = rows_of(grad, view, keepdim, acc);
  const at::Tensor l = rows_of(lse, view, keepdim, at::kDouble);
  at::Tensor dx = empty_output(x.sizes(), x.scalar_type(), x);
  if (dx.numel() > 0) {
    cpu_kernels().logsumexp_backward(g.const_data_ptr(), l.const_data_ptr<double>(),
                                     view.x.const_data_ptr(), view.x.scalar_type(),
                                     dx.mutable_data_ptr(), view.layout);
  }
  return dx;
}

std::tuple<at::Tensor, at::Tensor> fused_cross_entropy_cpu(const at::Tensor& logits,
                                                           const at::Tensor& target,
                                                           const c10::optional<at::Tensor>& weight,
                                                           int64_t ignore_index,
                                                           double label_smoothing, double z_loss) {
  check_floating("fused_cross_entropy", "the logits", logits.scalar_type());
  const ClassRows in = class_rows("fused_cross_entropy", logits, target, weight, ignore_index,
                                  accumulation_type(logits.scalar_type()));
  at::Tensor loss =
      at::empty({in.rows}, logits.options().dtype(accumulation_type(logits.scalar_type())));
  at::Tensor lse = at::empty({in.rows}, logits.options().dtype(at::kDouble));
  if (in.rows > 0 && in.classes > 0) {
    cpu_kernels().cross_entropy_forward(in.logits.const_data_ptr(), in.logits.scalar_type(),
                                        in.x_stride, in.target.const_data_ptr<int64_t>(),
                                        in.weight ? in.weight->const_data_ptr() : nullptr, in.rows,
                                        in.classes, ignore_index, label_smoothing, z_loss,
                                        loss.mutable_data_ptr(), lse.mutable_data_ptr<double>());
  }
  return {loss, lse};
}

at::Tensor fused_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_lse,
                                            const at::Tensor& logits, const at::Tensor& target,
                                            const c10::optional<at::Tensor>& weight,
                                            const at::Tensor& lse, int64_t ignore_index,
                                            double label_smoothing, double z_loss) {
  check_floating("fused_cross_entropy_backward", "the logits", logits.scalar_type());
  const ClassRows in = class_rows("fused_cross_entropy_backward", logits, target, weight,
                                  ignore_index, accumulation_type(logits.scalar_type()));
  const at::Tensor g = grad_loss.to(accumulation_type(logits.scalar_type())).contiguous();
  const at::Tensor gl = grad_lse.to(at::kDouble).contiguous();
  const at::Tensor l = lse.to(at::kDouble).contiguous();
  at::Tensor dx = empty_output(logits.sizes(), logits.scalar_type(), logits);
  if (dx.numel() > 0) {
    cpu_kernels().cross_entropy_backward(
        g.const_data_ptr(), gl.const_data_ptr<double>(), in.logits.const_data_ptr(),
        in.logits.scalar_type(), in.x_stride, in.target.const_data_ptr<int64_t>(),
        in.weight ? in.weight->const_data_ptr() : nullptr, l.const_data_ptr<double>(), in.rows,
        in.classes, ignore_index, label_smoothing, z_loss, dx.mutable_data_ptr());
  }
  return dx;
}

std::string cpu_capability() { return cpu_kernels().capability; }

}  // namespace

TORCH_LIBRARY_IMPL(stablekernels, CPU, m) {
  m.impl("fused_softmax", &fused_softmax_cpu);
  m.impl("fused_logsumexp", &fused_logsumexp_cpu);
  m.impl("fused_softmax_backward", &fused_softmax_backward_cpu);
  m.impl("fused_logsumexp_backward", &fused_logsumexp_backward_cpu);
  m.impl("fused_cross_entropy", &fused_cross_entropy_cpu);
  m.impl("fused_cross_entropy_backward", &fused_cross_entropy_backward_cpu);
}

TORCH_LIBRARY_FRAGMENT(stablekernels, m) {
  m.def("fused_cpu_capability() -> str", &cpu_capability);
}

}  // namespace stablekernels
