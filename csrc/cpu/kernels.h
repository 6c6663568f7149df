// The CPU kernels' interface: raw pointers and a row layout, no tensors.
//
// csrc/cpu/kernels_impl.h is compiled once per CPU capability (DEFAULT, AVX2, AVX512; see
// kernels_*.cpp and setup.py), each filling one KernelTable; cpu_kernels() returns the table
// of the capability ATen itself runs with (ATEN_CPU_CAPABILITY is honoured).
#pragma once

#include <c10/core/ScalarType.h>
#include <stablekernels/layout.h>

namespace stablekernels::cpu {

using stablekernels::Layout;

struct KernelTable {
  const char* capability;

  // y = softmax(x) (or log_softmax if `log`) along n. x and y may have different dtypes;
  // computed in fp32 (fp64 if either is fp64) and rounded once into y.
  void (*softmax_forward)(const void* x, c10::ScalarType x_type, void* y, c10::ScalarType y_type,
                          Layout layout, bool log);

  // out = logsumexp(x) along n in x's dtype, and lse the same in fp64 (what the backward
  // uses: a float lse at large offsets would put its rounding into every gradient entry).
  void (*logsumexp_forward)(const void* x, c10::ScalarType x_type, void* out, double* lse,
                            Layout layout);

  // dx from grad and y (same dtype, both contiguous): softmax dx = y * (grad - sum(grad * y));
  // log_softmax dx = grad - exp(y) * sum(grad). dx may have another dtype.
  void (*softmax_backward)(const void* grad, const void* y, c10::ScalarType y_type, void* dx,
                           c10::ScalarType dx_type, Layout layout, bool log);

  // dx = grad_row * exp(x - lse_row); grad is per row in the accumulation dtype of x (fp32,
  // or fp64 for fp64 x), lse per row in fp64; dx has x's dtype.
  void (*logsumexp_backward)(const void* grad, const double* lse, const void* x,
                             c10::ScalarType x_type, void* dx, Layout layout);

  // Cross-entropy of `rows` contiguous rows of `classes` logits (row r at x + r * x_stride)
  // against class targets (int64; ignore_index counts nothing), with optional class weights
  // (the accumulation dtype of x). Writes the per-row loss (fp32, weighted, smoothed,
  // z-loss added; 0 on ignored rows; in the accumulation dtype: fp32, or fp64 for fp64) and
  // lse (fp64).
  void (*cross_entropy_forward)(const void* x, c10::ScalarType x_type, int64_t x_stride,
                                const int64_t* target, const void* weight, int64_t rows,
                                int64_t classes, int64_t ignore_index, double label_smoothing,
                                double z_loss, void* loss, double* lse);

  // dx (contiguous, x's dtype) from the upstream gradients of the per-row losses (the
  // accumulation dtype) and lse (fp64), and the saved lse.
  void (*cross_entropy_backward)(const void* grad_loss, const double* grad_lse, const void* x,
                                 c10::ScalarType x_type, int64_t x_stride, const int64_t* target,
                                 const void* weight, const double* lse, int64_t rows,
                                 int64_t classes, int64_t ignore_index, double label_smoothing,
                                 double z_loss, void* dx);
};

namespace capability_default {
extern const KernelTable kTable;
}
namespace capability_avx2 {
extern const KernelTable kTable;
}
namespace capability_avx512 {
extern const KernelTable kTable;
}

// The table for the CPU capability ATen runs with here.
const KernelTable& cpu_kernels();

}  // namespace stablekernels::cpu
