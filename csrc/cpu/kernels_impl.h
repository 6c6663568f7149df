// The CPU kernels, written once and compiled once per CPU capability: kernels_default.cpp,
// kernels_avx2.cpp and kernels_avx512.cpp include this file with SK_CAPABILITY_NAMESPACE
// set and the capability's compiler flags and CPU_CAPABILITY macros, so at::vec::Vectorized
// is 128/256/512 bits wide in each (as in ATen's own kernels).
//
// Numerics (see stablekernels/online_softmax.h): a row is processed in chunks of kChunk
// elements. Per chunk, pass 1 takes the max m (and whether a NaN is there), pass 2 (the
// chunk is still in L1/L2) sums exp(x - m) over the chunk with that one max term left out,
// in fp32 blocks of kBlock vectors added into a double: the chunk's (m, s'), with no
// cancellation. Chunk states merge by the rule of the header, in double. So the row is read
// from memory once for its statistics, and s' carries the error of short fp32 sums only.
// Outputs are exp(x_j - m) / (1 + s') by division, or (x_j - m) - log1p(s'). softmax keeps
// the exps of pass 2 (in the output when it is fp32/fp64, else in a per-thread buffer, for
// rows up to kKeepExpsMax) and scales them: one exp per element; longer rows of halves, and
// rows split over threads into a half output, compute them again in the write pass. Halves
// are read as fp32 and rounded once on store; fp64 is computed in fp64.
//
// Speed: the exp is a chain of about 40 cycles of dependent operations, so the loops that
// compute it take several full vectors per iteration (independent chains side by side),
// with partial vectors and bookkeeping (the max's place, NaN checks) outside the inner loop.
//
// The kernels are split by concern, as ATen's native/cpu kernels are, into headers included
// here: vec_math.h (vector arithmetic: the exp, horizontal reductions, division),
// load_store.h (loads, stores and streaming stores), row_stats.h (the row statistics and the
// drivers over threads), and one per op family: softmax_kernels.h, logsumexp_kernels.h,
// cross_entropy_kernels.h and masked_softmax_kernels.h. Each opens the namespace below, so
// every capability gets its own copy. This file holds the type-erased entry points and the
// capability's kTable.

#ifndef SK_CAPABILITY_NAMESPACE
#error "define SK_CAPABILITY_NAMESPACE before including kernels_impl.h"
#endif

#include <ATen/Dispatch.h>

#include "cross_entropy_kernels.h"
#include "kernels.h"
#include "linear_tile_kernels.h"
#include "logsumexp_kernels.h"
#include "masked_softmax_kernels.h"
#include "softmax_kernels.h"

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

// ---------------------------------------------------------------------------------------
// dtype dispatch: the four floating dtypes, for input and output independently. A nested
// dispatch names the outer scalar_t first: the inner one declares its own.

#define SK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

void softmax_forward(const void* x, c10::ScalarType x_type, void* y, c10::ScalarType y_type,
                     Layout layout, bool log) {
  SK_DISPATCH(x_type, "stablekernels softmax", [&] {
    using T = scalar_t;
    SK_DISPATCH(y_type, "stablekernels softmax", [&] {
      softmax_forward_typed(static_cast<const T*>(x), static_cast<scalar_t*>(y), layout, log);
    });
  });
}

void logsumexp_forward(const void* x, c10::ScalarType x_type, void* out, double* lse,
                       Layout layout) {
  SK_DISPATCH(x_type, "stablekernels logsumexp", [&] {
    logsumexp_forward_typed(static_cast<const scalar_t*>(x), static_cast<scalar_t*>(out), lse,
                            layout);
  });
}

void softmax_backward(const void* grad, const void* y, c10::ScalarType y_type, void* dx,
                      c10::ScalarType dx_type, Layout layout, bool log) {
  SK_DISPATCH(y_type, "stablekernels softmax_backward", [&] {
    using T = scalar_t;
    SK_DISPATCH(dx_type, "stablekernels softmax_backward", [&] {
      softmax_backward_typed(static_cast<const T*>(grad), static_cast<const T*>(y),
                             static_cast<scalar_t*>(dx), layout, log);
    });
  });
}

void logsumexp_backward(const void* grad, int64_t grad_stride, const double* lse, const void* x,
                        c10::ScalarType x_type, void* dx, Layout layout) {
  SK_DISPATCH(x_type, "stablekernels logsumexp_backward", [&] {
    logsumexp_backward_typed(static_cast<const scalar_t*>(grad), grad_stride, lse,
                             static_cast<const scalar_t*>(x), static_cast<scalar_t*>(dx), layout);
  });
}

void cross_entropy_forward(const void* x, c10::ScalarType x_type, int64_t x_stride,
                           const int64_t* target, const void* weight, int64_t rows, int64_t classes,
                           bool smoothing, double* nll, double* smooth, double* lse) {
  SK_DISPATCH(x_type, "stablekernels cross_entropy", [&] {
    cross_entropy_forward_typed(static_cast<const scalar_t*>(x), x_stride, target,
                                static_cast<const acc_of<scalar_t>*>(weight), rows, classes,
                                smoothing, nll, smooth, lse);
  });
}

void cross_entropy_backward(const void* x, c10::ScalarType x_type, int64_t x_stride,
                            const int64_t* target, const void* weight, const void* terms,
                            int64_t rows, int64_t classes, void* dx) {
  SK_DISPATCH(x_type, "stablekernels cross_entropy_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    cross_entropy_backward_typed(
        static_cast<const scalar_t*>(x), x_stride, target, static_cast<const acc_t*>(weight),
        static_cast<const acc_t*>(terms), rows, classes, static_cast<scalar_t*>(dx));
  });
}

void cross_entropy_loss(const void* x, c10::ScalarType x_type, int64_t x_stride,
                        const int64_t* target, const void* weight, int64_t rows,
                        const CrossEntropyOptions& options, void* loss, double* lse,
                        double* counts) {
  SK_DISPATCH(x_type, "stablekernels cross_entropy_loss", [&] {
    using acc_t = acc_of<scalar_t>;
    cross_entropy_loss_typed(static_cast<const scalar_t*>(x), x_stride, target,
                             static_cast<const acc_t*>(weight), rows, options,
                             static_cast<acc_t*>(loss), lse, counts);
  });
}

void cross_entropy_loss_backward(const void* grad, int64_t grad_stride, const double* grad_lse,
                                 int64_t grad_lse_stride, const void* x, c10::ScalarType x_type,
                                 int64_t x_stride, const int64_t* target, const void* weight,
                                 const double* lse, const double* counts, int64_t rows,
                                 const CrossEntropyOptions& options, void* dx) {
  SK_DISPATCH(x_type, "stablekernels cross_entropy_loss_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    cross_entropy_loss_backward_typed(
        static_cast<const acc_t*>(grad), grad_stride, grad_lse, grad_lse_stride,
        static_cast<const scalar_t*>(x), x_stride, target, static_cast<const acc_t*>(weight), lse,
        counts, rows, options, static_cast<scalar_t*>(dx));
  });
}

void masked_softmax_forward(const void* x, c10::ScalarType x_type, void* y, c10::ScalarType y_type,
                            int64_t rows, int64_t n, const RowMask& mask, double scale, bool causal,
                            int64_t query_len, int64_t causal_offset, MaskedMode mode,
                            MaskedRows masked_rows, double* lse) {
  SK_DISPATCH(x_type, "stablekernels masked_softmax", [&] {
    using T = scalar_t;
    SK_DISPATCH(y_type, "stablekernels masked_softmax", [&] {
      using U = scalar_t;
      using acc_t = acc_of<T, U>;
      const auto* xt = static_cast<const T*>(x);
      auto* yt = static_cast<U*>(y);
      if (mask.data != nullptr && mask.additive) {
        masked_softmax_typed<T, U, acc_t>(xt, yt, rows, n, mask, scale, causal, query_len,
                                          causal_offset, mode, masked_rows, lse);
      } else {
        masked_softmax_typed<T, U, bool>(xt, yt, rows, n, mask, scale, causal, query_len,
                                         causal_offset, mode, masked_rows, lse);
      }
    });
  });
}

void cross_entropy_tile(const void* y, c10::ScalarType type, int64_t rows, int64_t n,
                        const int64_t* target, int64_t class_start, const void* weight,
                        double softcap, double temperature, bool smoothing, bool entropy,
                        double* state) {
  AT_DISPATCH_FLOATING_TYPES(type, "stablekernels cross_entropy_tile", [&] {
    cross_entropy_tile_typed(static_cast<const scalar_t*>(y), rows, n, target, class_start,
                             static_cast<const scalar_t*>(weight),
                             LogitTransform<scalar_t>::make(softcap, temperature), smoothing, entropy,
                             state);
  });
}

void cross_entropy_tile_backward(void* y, c10::ScalarType type, int64_t rows, int64_t n,
                                 const int64_t* target, int64_t class_start, const void* weight,
                                 const void* terms, double softcap, double temperature,
                                 const void* grad_entropy) {
  AT_DISPATCH_FLOATING_TYPES(type, "stablekernels cross_entropy_tile_backward", [&] {
    cross_entropy_tile_backward_typed(
        static_cast<scalar_t*>(y), rows, n, target, class_start,
        static_cast<const scalar_t*>(weight), static_cast<const scalar_t*>(terms),
        LogitTransform<scalar_t>::make(softcap, temperature),
        static_cast<const scalar_t*>(grad_entropy));
  });
}

void masked_softmax_backward(const void* grad, const void* y, c10::ScalarType y_type,
                             const double* lse, void* dx, c10::ScalarType dx_type, int64_t rows,
                             int64_t n, double scale, bool log) {
  SK_DISPATCH(y_type, "stablekernels masked_softmax_backward", [&] {
    using T = scalar_t;
    SK_DISPATCH(dx_type, "stablekernels masked_softmax_backward", [&] {
      masked_softmax_backward_typed(static_cast<const T*>(grad), static_cast<const T*>(y), lse,
                                    static_cast<scalar_t*>(dx), rows, n, scale, log);
    });
  });
}

#undef SK_DISPATCH

}  // namespace

extern const KernelTable kTable;
const KernelTable kTable = {SK_CAPABILITY_NAME,     softmax_forward,       logsumexp_forward,
                            softmax_backward,       logsumexp_backward,    cross_entropy_forward,
                            cross_entropy_backward, masked_softmax_forward, cross_entropy_loss,
                            cross_entropy_loss_backward, cross_entropy_tile,
                            cross_entropy_tile_backward, masked_softmax_backward};

}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
