// The row layout every kernel works on, CPU and CUDA alike.
//
// The input is `outer` blocks of n * inner elements, block o starting at o * x_stride;
// element j of row (o, i) is at o * x_stride + j * inner + i. The output (and every other
// full-size tensor of a kernel) is contiguous: the same element is at
// o * n * inner + j * inner + i. Rows are contiguous when inner == 1 (x_stride > n is a
// sliced input, x[:, :n]); with inner > 1 (reducing a dim that is not the last), neighbouring
// rows are neighbours in memory, which the kernels use to keep loads contiguous without a
// transpose. Per-row values (logsumexp results, their gradients) are indexed o * inner + i.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_LAYOUT_HOST_DEVICE __host__ __device__
#else
#define SK_LAYOUT_HOST_DEVICE
#endif

namespace stablekernels {

struct Layout {
  int64_t outer;
  int64_t n;
  int64_t inner;
  int64_t x_stride;  // elements between the starts of consecutive outer blocks of the input

  SK_LAYOUT_HOST_DEVICE int64_t rows() const { return outer * inner; }
  SK_LAYOUT_HOST_DEVICE int64_t block() const { return n * inner; }
};

}  // namespace stablekernels
