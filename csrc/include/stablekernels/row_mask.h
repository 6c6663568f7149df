// A mask read in place by its strides, never expanded in memory, CPU and CUDA alike: element
// j of row r is at data + offset(r) + j * col_stride (in elements), offset(r) =
// sum_d idx_d * strides[d] with idx the digits of r over the row dims' sizes (x's dims but
// the last, size-1 dims dropped and dims the mask steps through as one merged; outermost
// first). The bindings fill it from the tensor's sizes and strides (masked_softmax_args,
// csrc/bindings/row_view.h).
#pragma once

#include <stablekernels/layout.h>

#include <cstdint>

namespace stablekernels {

struct RowMask {
  static constexpr int kMaxDims = 8;
  const void* data = nullptr;  // nullptr: no mask
  bool additive = false;       // values of the accumulation dtype, added; else bool, true keeps
  int dims = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  int64_t col_stride = 0;

  // offset(r) by plain divisions (the CUDA kernels divide by per-launch magic numbers).
  SK_LAYOUT_HOST_DEVICE int64_t offset(int64_t r) const {
    int64_t o = 0;
    for (int d = dims - 1; d >= 0; --d) {
      o += (r % sizes[d]) * strides[d];
      r /= sizes[d];
    }
    return o;
  }
};

}  // namespace stablekernels
