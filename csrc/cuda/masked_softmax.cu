// CUDA masked softmax (attention-ready): softmax, log_softmax, the logsumexp or the row
// statistics only of t = scale * x + mask along the last dim, with a bool or additive mask
// read in place by its strides and an optional causal limit; and its backward. The contract:
// kernels.h (masked_softmax_forward, masked_softmax_backward); the numerics:
// stablekernels/online_softmax.h, the same (m, s') rule as softmax.cu, and
// stablekernels/masked_rows.h (the modes, dead rows, the backward's rule). No torch header.
//
// x (T: fp32, fp64, fp16, bf16) is `rows` contiguous rows of n elements; y (U, contiguous, x's
// shape) and t are in A = acc_of<T, U>; lse is fp64, one per row. Offsets are 64-bit.
//
// Rows of up to 512 * kElements = 8192 elements are held in registers by a group of R threads
// (R a power of two from 4 to 512, the smallest that holds the row: 128 / R rows per block of
// 128 threads up to R = 32, a block of R threads per row beyond), kElements = 16 per thread:
// each thread issues all of its loads first (x in 16-byte packs in the frame of the row's
// packs, common.cuh; the mask in loads of up to 16 bytes where its column stride is 1 and the
// span aligned, element by element at its stride otherwise), forms t, then the row's max (a
// group reduction), one exp per element against it (SumsAtMax), the sums reduced, the state
// (state_at_max) and the outputs.
// Longer rows: one block of 512 threads per row (grid-stride over rows) walks the row in tiles
// of the same shape (512 * 16 elements), each tile's loads issued before its exps; each thread
// keeps its sums against its running max (one more exp per thread when a tile raises it, as
// cross_entropy.cu), the block merges the threads' states (common.cuh's block_reduce_all), and
// a second walk reads x and the mask again and writes y (a second exp per element). No
// workspace and no split of a row over blocks: a row of 256k elements is 32 tiles of one block.
//
// Per row r, before its loads: the mask's offset, from the digits of r over the coalesced row
// dims (RowMask; divisions as multiplications by per-launch magic numbers, no 64-bit division
// call; statically indexed, so the parameter struct stays in constant memory), and the causal
// limit L = clamp(r % query_len + offset + 1, 0, n): only [0, L) is read and exponentiated,
// [L, n) is written as t = -inf (0 / -inf; NaN on a NaN row), and a row with L = 0 is dead
// (lse -inf, y 0 / -inf, or NaN with MaskedRows::kNan) without a load. The logsumexp mode
// writes y[r] (rows values) from the lse, as the row kernels of softmax.cu do.
//
// The backward (masked_softmax_backward) reads no mask: grad and y of a row in registers as
// softmax.cu's backward rows (BackwardPiece, common.cuh: kBackwardItems packs of each per
// thread, the same group sizes), the row's sum reduced, then each value through
// masked_gradient (masked_rows.h: the scale, 0 at a dropped element of log_softmax), 0
// throughout a row whose lse is -inf. Rows longer than a group of 512 holds: one block per
// row walks it twice (the sum, then dx), with no workspace, in one launch.
#include <stablekernels/masked_rows.h>

#include "common.cuh"

namespace stablekernels::cuda {
namespace detail {
namespace {

constexpr int kMaxRowThreads = 512;  // the largest group (a block per row); a long row's block
constexpr int kElements = 16;        // elements of x per thread, per row or tile

// 16-byte packs of x per thread: 4 of fp32, 2 of fp16 / bf16, 8 of fp64.
template <typename T>
constexpr int kItems = kElements / kPack<T>;

// Threads of a block whose groups have R threads: 128 (several rows) up to R = 32, else R.
__host__ __device__ constexpr int block_threads(int R) { return R <= 32 ? 128 : R; }

enum class MaskKind : int { kNone, kBool, kAdditive };

// Division by a divisor d >= 1 fixed per launch, without a division instruction (a 64-bit
// division is a call, whose saved registers spill the row held in registers): q = n / d for
// every 64-bit n by one high multiply, a subtraction and two shifts (Granlund & Montgomery
// 1994, Fig. 4.1), with magic = floor(2^64 (2^l - d) / d) + 1, l = ceil(log2 d), set on the
// host.
struct Divisor {
  uint64_t d, magic;
  int shift1, shift2;  // min(l, 1), max(l - 1, 0)

  static Divisor of(uint64_t d) {
    int l = 0;
    while (l < 64 && (uint64_t(1) << l) < d) ++l;
    const unsigned __int128 wide = (static_cast<unsigned __int128>(1) << 64) *
                                   ((static_cast<unsigned __int128>(1) << l) - d) / d;
    return {d, static_cast<uint64_t>(wide) + 1, l < 1 ? l : 1, l > 1 ? l - 1 : 0};
  }

  // Returns q % d and sets q = q / d (q >= 0).
  __device__ __forceinline__ int64_t div_mod(int64_t& q) const {
    const uint64_t n = static_cast<uint64_t>(q);
    const uint64_t t = __umul64hi(magic, n);
    const uint64_t quotient = (t + ((n - t) >> shift1)) >> shift2;
    q = static_cast<int64_t>(quotient);
    return static_cast<int64_t>(n - quotient * d);
  }
};

// Everything the kernels take besides x, y and lse (by value: constant memory).
template <typename A>
struct MaskedArgs {
  int64_t rows, n;
  const void* mask;  // null: no mask
  MaskKind kind;
  int mask_dims;                       // RowMask's dims, outermost first
  Divisor sizes[RowMask::kMaxDims];    // of the row dims
  int64_t strides[RowMask::kMaxDims];  // the mask's, of the row dims
  int64_t col_stride;                  // the mask's along the row
  A scale;
  bool causal;
  Divisor query_len;      // >= 1
  int64_t causal_offset;  // clamped to [-query_len, n]: L below cannot overflow
  MaskedRows masked_rows;  // a dead row's outputs: 0 / -inf, or NaN
  bool logsumexp;          // y[r] = the lse of row r (MaskedMode::kLogsumexp), not the rows
};

struct RowInfo {
  int64_t mask_offset;  // of the row's element 0, in mask elements
  int64_t limit;        // L: elements [0, L) are read, [L, n) dropped (causal)
};

template <typename A>
__device__ __forceinline__ RowInfo row_info(const MaskedArgs<A>& a, int64_t row) {
  RowInfo info{0, a.n};
  if (a.kind != MaskKind::kNone) {
    int64_t q = row;
    // Innermost dim first; static indices (a dynamic one would copy the struct to local memory).
#pragma unroll
    for (int d = RowMask::kMaxDims - 1; d >= 0; --d) {
      if (d < a.mask_dims) info.mask_offset += a.sizes[d].div_mod(q) * a.strides[d];
    }
  }
  if (a.causal) {
    int64_t q = row;
    const int64_t limit = a.query_len.div_mod(q) + a.causal_offset + 1;
    info.limit = limit < 0 ? 0 : limit < a.n ? limit : a.n;
  }
  return info;
}

// scale * x rounded on its own, never fused with the mask's addition into an fma: t is the
// contract's (and the CPU kernels') two roundings.
__device__ __forceinline__ float product(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double product(double a, double b) { return __dmul_rn(a, b); }

// The mask values of elements j .. j + VEC - 1 of a row (`row` at the row's element 0), those
// in [0, limit); 0 elsewhere. One access of up to 16 bytes per kWidth elements where the
// column stride is 1 and the span lies inside and is aligned; else element by element.
template <typename M, int VEC>
__device__ __forceinline__ void load_mask(const M* __restrict__ row, int64_t stride, int64_t j,
                                          int64_t limit, M (&out)[VEC]) {
  constexpr int kWidth = VEC * sizeof(M) <= 16 ? VEC : static_cast<int>(16 / sizeof(M));
  if (stride == 1 && j >= 0 && j + VEC <= limit &&
      reinterpret_cast<uintptr_t>(row + j) % (kWidth * sizeof(M)) == 0) {
#pragma unroll
    for (int c = 0; c < VEC / kWidth; ++c) {
      const Pack<M, kWidth> p = *reinterpret_cast<const Pack<M, kWidth>*>(row + j + c * kWidth);
#pragma unroll
      for (int e = 0; e < kWidth; ++e) out[c * kWidth + e] = p.v[e];
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      out[e] = j + e >= 0 && j + e < limit ? row[(j + e) * stride] : M(0);
    }
  }
}

// The t values a thread holds of a piece of a row: kItems packs at frame positions
// (k * R + lane) * kVec of the piece, as element indices `slot(first, k, lane)` (first: the
// piece's start minus the row's pack shift); -inf outside [0, limit).
template <typename T, typename A, int R>
struct Terms {
  static constexpr int kVec = kPack<T>;
  static constexpr int kN = kItems<T>;
  A t[kN][kVec];

  static __device__ __forceinline__ int64_t slot(int64_t first, int k, int lane) {
    return first + (static_cast<int64_t>(k) * R + lane) * kVec;
  }

  // Every load (x, then the mask) before t is formed; nothing at or past `limit` is read.
  template <MaskKind KIND>
  __device__ __forceinline__ void load_as(const T* __restrict__ xr, const void* mask_row,
                                          int64_t mask_stride, int64_t first, int64_t limit,
                                          int lane, A scale) {
    using M = std::conditional_t<KIND == MaskKind::kAdditive, A, uint8_t>;
    Pack<T, kVec> p[kN];
    M mv[kN][kVec];
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const int64_t j = slot(first, k, lane);
      if (j < limit) {
        p[k] = load_pack(xr, j, limit, from_acc<T>(0.0f));
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) p[k].v[e] = from_acc<T>(0.0f);
      }
    }
    if constexpr (KIND != MaskKind::kNone) {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const int64_t j = slot(first, k, lane);
        if (j < limit) {
          load_mask(static_cast<const M*>(mask_row), mask_stride, j, limit, mv[k]);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) mv[k][e] = M(0);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const int64_t j = slot(first, k, lane);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        A v = product(scale, to_acc<A>(p[k].v[e]));
        if constexpr (KIND == MaskKind::kBool) v = mv[k][e] != 0 ? v : -infinity<A>();
        if constexpr (KIND == MaskKind::kAdditive) v += mv[k][e];
        t[k][e] = j + e >= 0 && j + e < limit ? v : -infinity<A>();
      }
    }
  }

  __device__ __forceinline__ void load(const T* __restrict__ xr, const MaskedArgs<A>& a,
                                       const RowInfo& info, int64_t first, int lane) {
    const int64_t limit = info.limit;
    switch (a.kind) {
      case MaskKind::kBool:
        load_as<MaskKind::kBool>(xr, static_cast<const uint8_t*>(a.mask) + info.mask_offset,
                                 a.col_stride, first, limit, lane, a.scale);
        break;
      case MaskKind::kAdditive:
        load_as<MaskKind::kAdditive>(xr, static_cast<const A*>(a.mask) + info.mask_offset,
                                     a.col_stride, first, limit, lane, a.scale);
        break;
      default:
        load_as<MaskKind::kNone>(xr, nullptr, 0, first, limit, lane, a.scale);
    }
  }

  __device__ __forceinline__ A max() const {
    A m = -infinity<A>();
#pragma unroll
    for (int k = 0; k < kN; ++k) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) m = fmax(m, t[k][e]);
    }
    return m;
  }
};

// The outputs of a row from its final state: exp(t - m) * (1 / (1 + s')) (softmax) or
// (t - m) - log1p(s') (log_softmax), from the held exp(t - m) or t - m; an element past the
// causal limit as t = -inf (0 / -inf, NaN on a NaN row); every element of a dead row (m = -inf,
// s' not NaN: every t = -inf) 0 / -inf, where torch's softmax would be NaN.
template <typename A, bool LOG>
struct RowOutput {
  A factor;   // 1 / (1 + s') or log1p(s'); NaN on a NaN row (a NaN or a +inf t)
  A dropped;  // the output of t = -inf
  bool dead;

  __device__ __forceinline__ RowOutput(const RowState<A>& st, MaskedRows masked_rows) {
    dead = isinf(st.m) && st.m < 0 && !isnan(st.s);
    factor = LOG ? log_softmax_shift(st) : softmax_scale(st);
    dropped = dead ? dead_row_value<A>(LOG, masked_rows)
                   : (LOG ? -infinity<A>() - factor : A(0) * factor);
  }

  __device__ __forceinline__ A operator()(A held, bool kept) const {
    if (dead || !kept) return dropped;
    return LOG ? held - factor : held * factor;
  }
};

// The row's fp64 lse and, in the logsumexp mode, its output y[row] (rounded once from A, as
// softmax.cu's logsumexp; NaN on a dead row for MaskedRows::kNan).
template <typename U, typename A>
__device__ __forceinline__ void store_lse(U* y, double* lse, int64_t row, const RowState<A>& st,
                                          const MaskedArgs<A>& a) {
  const double value = finish_lse<double>(st);
  lse[row] = value;
  if (a.logsumexp) y[row] = from_acc<U>(static_cast<A>(masked_logsumexp(value, a.masked_rows)));
}

// ---------------------------------------------------------------------------------------
// Rows in registers.

// LOG a template argument: one exp per element in each instantiation (softmax.cu). y null:
// lse only (statistics); a.logsumexp: y[r] the lse, in U.
template <typename T, typename U, int R, bool LOG>
__global__ void __launch_bounds__(block_threads(R))
    masked_softmax_rows_kernel(const T* __restrict__ x, U* __restrict__ y, double* __restrict__ lse,
                               MaskedArgs<acc_of<T, U>> a) {
  using A = acc_of<T, U>;
  using Piece = Terms<T, A, R>;
  constexpr int kRowsPerBlock = block_threads(R) / R;
  const int lane = static_cast<int>(threadIdx.x) % R;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / R;
       row < a.rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const RowInfo info = row_info(a, row);
    const T* xr = x + row * a.n;
    const int64_t first = -pack_shift(xr);
    Piece piece;
    piece.load(xr, a, info, first, lane);
    const A m = group_reduce_all<R>(piece.max(), Max{});
    SumsAtMax<A> sums = SumsAtMax<A>::empty();
#pragma unroll
    for (int k = 0; k < Piece::kN; ++k) {
      if (Piece::slot(first, k, lane) < info.limit) {
#pragma unroll
        for (int e = 0; e < Piece::kVec; ++e) {
          const A t = piece.t[k][e];
          const A ex = sums.add(t, m);
          piece.t[k][e] = LOG ? t - m : ex;
        }
      }
    }
    const RowState<A> st =
        state_at_max(m, group_reduce_all<R>(sums, Sum{}), static_cast<A>(info.limit));
    if (lane == 0) store_lse(y, lse, row, st, a);
    if (y == nullptr || a.logsumexp) continue;
    const RowOutput<A, LOG> out(st, a.masked_rows);
    U* yr = y + row * a.n;
#pragma unroll
    for (int k = 0; k < Piece::kN; ++k) {
      const int64_t j = Piece::slot(first, k, lane);
      if (j < a.n) {
        A v[Piece::kVec];
#pragma unroll
        for (int e = 0; e < Piece::kVec; ++e) v[e] = out(piece.t[k][e], j + e < info.limit);
        store_values(yr, j, a.n, v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Long rows: a block per row, two walks over its tiles.

template <typename T, typename U, bool LOG>
__global__ void __launch_bounds__(kMaxRowThreads)
    masked_softmax_long_kernel(const T* __restrict__ x, U* __restrict__ y, double* __restrict__ lse,
                               MaskedArgs<acc_of<T, U>> a) {
  using A = acc_of<T, U>;
  using Tile = Terms<T, A, kMaxRowThreads>;
  constexpr int64_t kTile = int64_t(kMaxRowThreads) * kElements;
  const int lane = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const RowInfo info = row_info(a, row);
    const T* xr = x + row * a.n;
    const int64_t start = -pack_shift(xr);
    // The thread's sums against its running max m, over `count` elements of [0, L).
    A m = -infinity<A>();
    SumsAtMax<A> sums = SumsAtMax<A>::empty();
    int64_t count = 0;
#pragma unroll 1
    for (int64_t first = start; first < info.limit; first += kTile) {
      Tile tile;
      tile.load(xr, a, info, first, lane);
      const A tile_max = tile.max();
      if (tile_max > m) {  // everything so far moves below the new max: one exp per thread
        const A factor = exp(m - tile_max);
        sums = {(sums.below + sums.at_max) * factor, A(0)};
        m = tile_max;
      }
#pragma unroll
      for (int k = 0; k < Tile::kN; ++k) {
        const int64_t j = Tile::slot(first, k, lane);
        count += inside<Tile::kVec>(j, info.limit);
        if (j < info.limit) {
#pragma unroll
          for (int e = 0; e < Tile::kVec; ++e) sums.add(tile.t[k][e], m);
        }
      }
    }
    const RowState<A> st =
        block_reduce_all<kMaxRowThreads>(state_at_max(m, sums, static_cast<A>(count)), Merge{});
    if (lane == 0) store_lse(y, lse, row, st, a);
    if (y == nullptr || a.logsumexp) continue;
    const RowOutput<A, LOG> out(st, a.masked_rows);
    U* yr = y + row * a.n;
#pragma unroll 1
    for (int64_t first = start; first < a.n; first += kTile) {
      Tile tile;
      tile.load(xr, a, info, first, lane);  // no load at or past L
#pragma unroll
      for (int k = 0; k < Tile::kN; ++k) {
        const int64_t j = Tile::slot(first, k, lane);
        if (j < a.n) {
          A v[Tile::kVec];
#pragma unroll
          for (int e = 0; e < Tile::kVec; ++e) {
            const A d = tile.t[k][e] - st.m;
            v[e] = out(LOG ? d : exp(d), j + e < info.limit);
          }
          store_values(yr, j, a.n, v);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward: the plain backward's values (BackwardPiece, common.cuh) through masked_gradient
// (masked_rows.h), 0 on a row whose lse is -inf. The row's sum is reduced on every row (the
// group's control flow stays uniform), its lse read once per thread.

template <typename A>
struct MaskedGradient {
  A scale;
  bool log, live;  // live: the row has a gradient (its lse is not -inf)

  __device__ __forceinline__ A operator()(A d, A y) const {
    return live ? masked_gradient(d, y, scale, log) : A(0);
  }
};

template <typename T, typename U, int R>
__global__ void __launch_bounds__(block_threads(R))
    masked_backward_rows_kernel(const T* __restrict__ grad, const T* __restrict__ y,
                                const double* __restrict__ lse, U* __restrict__ dx, int64_t rows,
                                int64_t n, acc_of<T, U> scale, bool log) {
  using A = acc_of<T, U>;
  constexpr int kRowsPerBlock = block_threads(R) / R;
  const int lane = static_cast<int>(threadIdx.x) % R;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / R; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t first = -pack_shift(grad + row * n);
    BackwardPiece<T, A, R, kBackwardItems> piece;
    const A total =
        group_reduce_all<R>(piece.load(grad + row * n, y + row * n, first, n, lane, log), Sum{});
    const MaskedGradient<A> finish{scale, log, masked_row_has_gradient(lse[row])};
    piece.store(dx + row * n, first, n, lane, total, log, finish);
  }
}

// Long rows: a block per row, its pieces of kMaxRowThreads * kLongBackwardItems packs walked
// twice (the threads' sums, reduced over the block, then dx). Two packs of each per thread:
// with four, ptxas spills the half-type instantiations (the walk keeps the row's pointers,
// bounds and sum live across both loops).
constexpr int kLongBackwardItems = 2;

template <typename T, typename U>
__global__ void __launch_bounds__(kMaxRowThreads)
    masked_backward_long_kernel(const T* __restrict__ grad, const T* __restrict__ y,
                                const double* __restrict__ lse, U* __restrict__ dx, int64_t rows,
                                int64_t n, acc_of<T, U> scale, bool log) {
  using A = acc_of<T, U>;
  using Piece = BackwardPiece<T, A, kMaxRowThreads, kLongBackwardItems>;
  constexpr int64_t kSpan = int64_t(kMaxRowThreads) * kLongBackwardItems * kPack<T>;
  const int lane = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* g = grad + row * n;
    const T* yr = y + row * n;
    const int64_t start = -pack_shift(g);
    A total = 0;
#pragma unroll 1
    for (int64_t first = start; first < n; first += kSpan) {
      Piece piece;
      total += piece.load(g, yr, first, n, lane, log);
    }
    total = block_reduce_all<kMaxRowThreads>(total, Sum{});
    const MaskedGradient<A> finish{scale, log, masked_row_has_gradient(lse[row])};
#pragma unroll 1
    for (int64_t first = start; first < n; first += kSpan) {
      Piece piece;
      piece.load(g, yr, first, n, lane, log);
      piece.store(dx + row * n, first, n, lane, total, log, finish);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launch plan.

// The smallest group (4 to kMaxRowThreads threads, `items` packs each) that holds rows of n
// elements wherever their packs start, or 0 (a block per row, walking it).
template <typename T>
int row_threads(int64_t n, bool aligned_rows, int items = kItems<T>) {
  const int64_t packs = ceil_div(n + (aligned_rows ? 0 : kPack<T> - 1), int64_t(kPack<T>));
  for (int r = 4; r <= kMaxRowThreads; r *= 2) {
    if (int64_t(r) * items >= packs) return r;
  }
  return 0;
}

template <typename T, typename U>
cudaError_t masked_softmax_typed(const T* x, U* y, double* lse, const MaskedArgs<acc_of<T, U>>& a,
                                 bool log, cudaStream_t s) {
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && a.n % kPack<T> == 0;
  const int r = row_threads<T>(a.n, aligned);
  if (r == 0) {
    const unsigned blocks = grid_size(a.rows);
    if (log) {
      masked_softmax_long_kernel<T, U, true><<<blocks, kMaxRowThreads, 0, s>>>(x, y, lse, a);
    } else {
      masked_softmax_long_kernel<T, U, false><<<blocks, kMaxRowThreads, 0, s>>>(x, y, lse, a);
    }
    return cudaGetLastError();
  }
  return with_row_threads(r, [&](auto threads) {
    constexpr int R = decltype(threads)::value;
    const unsigned blocks = grid_size(ceil_div(a.rows, int64_t(block_threads(R) / R)));
    if (log) {
      masked_softmax_rows_kernel<T, U, R, true><<<blocks, block_threads(R), 0, s>>>(x, y, lse, a);
    } else {
      masked_softmax_rows_kernel<T, U, R, false><<<blocks, block_threads(R), 0, s>>>(x, y, lse, a);
    }
    return cudaGetLastError();
  });
}

template <typename T, typename U>
cudaError_t masked_backward_typed(const T* grad, const T* y, const double* lse, U* dx, int64_t rows,
                                  int64_t n, acc_of<T, U> scale, bool log, cudaStream_t s) {
  const bool aligned = reinterpret_cast<uintptr_t>(grad) % 16 == 0 && n % kPack<T> == 0;
  const int r = row_threads<T>(n, aligned, kBackwardItems);
  if (r == 0) {
    masked_backward_long_kernel<T, U>
        <<<grid_size(rows), kMaxRowThreads, 0, s>>>(grad, y, lse, dx, rows, n, scale, log);
    return cudaGetLastError();
  }
  return with_row_threads(r, [&](auto threads) {
    constexpr int R = decltype(threads)::value;
    const unsigned blocks = grid_size(ceil_div(rows, int64_t(block_threads(R) / R)));
    masked_backward_rows_kernel<T, U, R>
        <<<blocks, block_threads(R), 0, s>>>(grad, y, lse, dx, rows, n, scale, log);
    return cudaGetLastError();
  });
}

}  // namespace
}  // namespace detail

cudaError_t masked_softmax_forward(const void* x, Dtype x_type, void* y, Dtype y_type, int64_t rows,
                                   int64_t n, const RowMask& mask, double scale, bool causal,
                                   int64_t query_len, int64_t causal_offset, MaskedMode mode,
                                   MaskedRows masked_rows, double* lse, cudaStream_t stream) {
  if (!valid_masked_mode(static_cast<int>(mode)) ||
      !valid_masked_rows(static_cast<int>(masked_rows)) || rows < 0 || n <= 0 ||
      (causal && query_len <= 0) || mask.dims < 0 || mask.dims > RowMask::kMaxDims ||
      (mode != MaskedMode::kStatistics && y == nullptr)) {
    return cudaErrorInvalidValue;
  }
  for (int d = 0; d < mask.dims; ++d) {
    if (mask.sizes[d] < 1) return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const detail::MaskKind kind = mask.data == nullptr ? detail::MaskKind::kNone
                                : mask.additive      ? detail::MaskKind::kAdditive
                                                     : detail::MaskKind::kBool;
  int64_t offset = causal_offset;
  if (causal) offset = offset < -query_len ? -query_len : offset > n ? n : offset;
  return detail::with_pair(x_type, y_type, [&](auto xt, auto yt) {
    using T = decltype(xt);
    using U = decltype(yt);
    using A = acc_of<T, U>;
    detail::MaskedArgs<A> args{};
    args.rows = rows;
    args.n = n;
    args.mask = mask.data;
    args.kind = kind;
    args.mask_dims = mask.dims;
    for (int d = 0; d < RowMask::kMaxDims; ++d) {
      args.sizes[d] = detail::Divisor::of(d < mask.dims ? static_cast<uint64_t>(mask.sizes[d]) : 1);
      args.strides[d] = d < mask.dims ? mask.strides[d] : 0;
    }
    args.col_stride = mask.col_stride;
    args.scale = static_cast<A>(scale);
    args.causal = causal;
    args.query_len = detail::Divisor::of(causal ? static_cast<uint64_t>(query_len) : 1);
    args.causal_offset = offset;
    args.masked_rows = masked_rows;
    args.logsumexp = mode == MaskedMode::kLogsumexp;
    return detail::masked_softmax_typed(
        static_cast<const T*>(x), mode == MaskedMode::kStatistics ? nullptr : static_cast<U*>(y),
        lse, args, mode == MaskedMode::kLogSoftmax, stream);
  });
}

cudaError_t masked_softmax_backward(const void* grad, const void* y, Dtype y_type,
                                    const double* lse, void* dx, Dtype dx_type, int64_t rows,
                                    int64_t n, double scale, bool log, cudaStream_t stream) {
  if (rows < 0 || n <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return detail::with_pair(y_type, dx_type, [&](auto yt, auto dt) {
    using T = decltype(yt);
    using U = decltype(dt);
    return detail::masked_backward_typed(static_cast<const T*>(grad), static_cast<const T*>(y),
                                         lse, static_cast<U*>(dx), rows, n,
                                         static_cast<acc_of<T, U>>(scale), log, stream);
  });
}

}  // namespace stablekernels::cuda
