// The fused kernel ops of the compiled extension, defined once here; CPU kernels register
// in cpu_ops.cpp and CUDA kernels in cuda_ops.cpp under these names. The public ops
// (stablekernels._library) route to them through the `cpp` and `cuda` backends.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(stablekernels, m) {
  // y = softmax(x) along dim (log_softmax if `log`), written in `dtype`.
  m.def("fused_softmax(Tensor x, int dim, ScalarType dtype, bool log) -> Tensor");
  // (logsumexp in x's dtype, logsumexp in the accumulation dtype)
  m.def("fused_logsumexp(Tensor x, int dim, bool keepdim) -> (Tensor, Tensor)");
  m.def(
      "fused_softmax_backward(Tensor grad, Tensor output, int dim, ScalarType input_dtype, "
      "bool log) -> Tensor");
  m.def(
      "fused_logsumexp_backward(Tensor grad, Tensor x, Tensor lse, int dim, bool keepdim) "
      "-> Tensor");
  // (per-row loss fp32, per-row lse fp64) of (rows, classes) logits and int64 targets.
  m.def(
      "fused_cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss) -> (Tensor, Tensor)");
  m.def(
      "fused_cross_entropy_backward(Tensor grad_loss, Tensor grad_lse, Tensor logits, "
      "Tensor target, Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, "
      "float z_loss) -> Tensor");
}
