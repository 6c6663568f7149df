// The checked arguments of the linear cross-entropy's tile epilogues (_fused_cross_entropy_tile
// and its backward), shared by the CPU and CUDA bindings. The router
// (stablekernels/_linear_tiles.py) establishes what is checked here; the checks keep a direct
// call of the private ops from reading or writing outside its tensors.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <stablekernels/linear_tiles.h>

#include <cstdint>

namespace stablekernels {

struct TileCall {
  int64_t rows, n;
  const void* weight;  // null without class weights
  double softcap;      // 0 without softcap
};

// logits: (rows, n), n > 0, contiguous fp32 or fp64; target (rows,) int64 contiguous;
// class_start >= 0; weight None or (>= class_start + n,) of the logits' dtype, contiguous;
// per_row: (tensor, columns) pairs of the logits' dtype (columns 0: (rows,)), contiguous;
// state: None or (rows, kTileStateFields) float64 contiguous. One device throughout.
inline TileCall tile_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                          int64_t class_start, const c10::optional<at::Tensor>& weight,
                          c10::optional<double> softcap, double temperature,
                          std::initializer_list<std::pair<const at::Tensor*, int64_t>> per_row,
                          const at::Tensor* state) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0, op,
              ": expects contiguous (rows, n > 0) logits");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
              ": expects float32 or float64 logits, got ", logits.scalar_type());
  const int64_t rows = logits.size(0), n = logits.size(1);
  const auto device = logits.device();
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong &&
                  target.is_contiguous() && target.device() == device,
              op, ": expects (rows,) int64 contiguous targets on the logits' device");
  TORCH_CHECK(class_start >= 0, op, ": class_start must be >= 0");
  TORCH_CHECK(softcap.value_or(1.0) > 0 && temperature > 0, op,
              ": softcap and temperature must be positive");
  if (weight) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) >= class_start + n &&
                    weight->scalar_type() == logits.scalar_type() && weight->is_contiguous() &&
                    weight->device() == device,
                op, ": expects the classes' weights (V >= class_start + n,) of the logits' dtype");
  }
  for (const auto& [t, columns] : per_row) {
    const bool shape = columns == 0 ? t->dim() == 1 && t->size(0) == rows
                                    : t->dim() == 2 && t->size(0) == rows && t->size(1) == columns;
    TORCH_CHECK(shape && t->scalar_type() == logits.scalar_type() && t->is_contiguous() &&
                    t->device() == device,
                op, ": expects per-row tensors (rows", columns == 0 ? "" : ", 5",
                ") of the logits' dtype, contiguous");
  }
  if (state != nullptr) {
    TORCH_CHECK(state->dim() == 2 && state->size(0) == rows &&
                    state->size(1) == kTileStateFields && state->scalar_type() == at::kDouble &&
                    state->is_contiguous() && state->device() == device,
                op, ": expects a (rows, ", kTileStateFields, ") float64 contiguous state");
  }
  return {rows, n, weight ? weight->const_data_ptr() : nullptr, softcap.value_or(0.0)};
}

}  // namespace stablekernels
