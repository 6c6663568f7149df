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
}
