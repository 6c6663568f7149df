// CUDA kernels: softmax, log_softmax and logsumexp, forward and backward (numerics contract
// of docs/design.md; stablekernels/online_softmax.h). No torch header. The bandwidth model
// behind the shapes below: docs/cuda_model.md.
//
// Contiguous rows (inner == 1) are held in registers by a group of R threads (R a power of
// two from 4 to 512, sized from the row length: several rows per block up to R = 32, a block
// per row beyond). Every thread first issues all of its loads (ITEMS 16-byte packs, in the
// frame of the row's packs, common.cuh), then:
//  - forward: the row's max (a group reduction), one exp per element against it, the sums of
//    the two-pass form (SumsAtMax: exps below the max, the count at it) reduced, and each
//    element written as exp(x - m) * (1 / (1 + s')) or (x - m) - log1p(s');
//  - backward: sum(g * y) (or sum(g)) reduced, then dx.
// Rows longer than a group of 512 holds take the split path: a block per piece of a row
// writes the piece's state (row_parts_kernel, backward_parts_kernel), one block per row
// merges them (merge_parts_kernel, sum_parts_kernel), and a block per piece writes its
// outputs from the row's state (x read twice; logsumexp reads it once).
// Strided rows (inner > 1): a block takes up to 32 neighbouring rows (columns of the outer
// block, contiguous in memory) and splits their length over its other threads; each thread
// folds its elements online (one exp each), the states merge across the block, and a second
// pass writes the outputs.
#include "common.cuh"

namespace stablekernels::cuda {
namespace detail {
namespace {

constexpr int kMaxRowThreads = 512;  // threads of the largest group (a block per row)
constexpr int kStridedThreads = 256;

// 16-byte packs per thread: 32 elements in fp32, bf16 and fp16 (16 in fp64) forward; the
// backward holds grad and y, kBackwardItems (common.cuh) packs of each.
template <typename T>
constexpr int kForwardItems = sizeof(T) == 2 ? 4 : 8;

// Threads of a block whose groups have R threads: 128 (several rows) up to R = 32, else R.
__host__ __device__ constexpr int block_threads(int R) { return R <= 32 ? 128 : R; }

// ---------------------------------------------------------------------------------------
// The forward pass over one piece of a row held in registers: loads, max, exps, sums. The
// piece spans frame positions [first + shift, first + shift + R * ITEMS * VEC) of the row;
// `count` is the number of its elements inside [0, n).

template <typename T, typename A, int R, int ITEMS>
struct ForwardPiece {
  static constexpr int kVec = kPack<T>;
  A v[ITEMS][kVec];  // x, then exp(x - m) (softmax) or x - m (log_softmax)
  A m;
  SumsAtMax<A> sums;

  __device__ __forceinline__ void load(const T* __restrict__ row, int64_t first, int64_t n,
                                       int lane) {
    Pack<T, kVec> p[ITEMS];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t j = slot<R, kVec>(first, k, lane);
      if (j < n) {
        p[k] = load_pack(row, j, n, minus_infinity<T>());
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) p[k].v[e] = minus_infinity<T>();
      }
    }
    m = -infinity<A>();
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        v[k][e] = to_acc<A>(p[k].v[e]);
        m = fmax(m, v[k][e]);
      }
    }
  }

  // Given the piece's max in m: one exp per element into v (or x - m when `log`), and the
  // thread's sums.
  __device__ __forceinline__ void exps(int64_t first, int64_t n, int lane, bool log) {
    sums = SumsAtMax<A>::empty();
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      if (slot<R, kVec>(first, k, lane) < n) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const A x = v[k][e];
          const A ex = sums.add(x, m);
          v[k][e] = log ? x - m : ex;
        }
      }
    }
  }

  // The whole forward fold of the piece, `count` of whose elements lie inside the row: loads,
  // the max reduced over the group, one exp per element, the sums reduced; the piece's state.
  __device__ __forceinline__ RowState<A> fold(const T* __restrict__ row, int64_t first, int64_t n,
                                              int lane, bool log, int64_t count) {
    load(row, first, n, lane);
    m = group_reduce_all<R>(m, Max{});
    exps(first, n, lane, log);
    return state_at_max(m, group_reduce_all<R>(sums, Sum{}), static_cast<A>(count));
  }

  // The row's outputs: v * scale (softmax) or v - shift (log_softmax), one of them per row.
  template <typename U>
  __device__ __forceinline__ void store(U* __restrict__ row, int64_t first, int64_t n, int lane,
                                        bool log, A scale, A shift) const {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t j = slot<R, kVec>(first, k, lane);
      if (j < n) {
        A out[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) out[e] = log ? v[k][e] - shift : v[k][e] * scale;
        store_values(row, j, n, out);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Forward, rows in registers.

// LOG a template argument: each instantiation has one exp per element (a run-time flag lets
// the compiler duplicate the exp loop, one copy per value).
template <typename T, typename U, int R, int ITEMS, bool LOG>
__global__ void __launch_bounds__(block_threads(R))
    softmax_rows_kernel(const T* __restrict__ x, U* __restrict__ y, int64_t rows, int64_t n,
                        int64_t x_stride) {
  using A = acc_of<T, U>;
  constexpr int kRowsPerBlock = block_threads(R) / R;
  const int lane = static_cast<int>(threadIdx.x) % R;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / R; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* xr = x + row * x_stride;
    const int64_t first = -pack_shift(xr);
    ForwardPiece<T, A, R, ITEMS> piece;
    const RowState<A> st = piece.fold(xr, first, n, lane, LOG, n);
    piece.store(y + row * n, first, n, lane, LOG, softmax_scale(st), log_softmax_shift(st));
  }
}

// lse in fp64 (the float state's m kept exactly), out in x's dtype (rounded once from A).
template <typename T, typename A>
__device__ __forceinline__ void store_lse(T* out, double* lse, int64_t row, RowState<A> st) {
  const double value = finish_lse<double>(st);
  lse[row] = value;
  out[row] = from_acc<T>(static_cast<A>(value));
}

template <typename T, int R, int ITEMS>
__global__ void __launch_bounds__(block_threads(R))
    logsumexp_rows_kernel(const T* __restrict__ x, T* __restrict__ out, double* __restrict__ lse,
                          int64_t rows, int64_t n, int64_t x_stride) {
  using A = acc_of<T>;
  constexpr int kRowsPerBlock = block_threads(R) / R;
  const int lane = static_cast<int>(threadIdx.x) % R;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / R; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* xr = x + row * x_stride;
    const int64_t first = -pack_shift(xr);
    ForwardPiece<T, A, R, ITEMS> piece;
    const RowState<A> st = piece.fold(xr, first, n, lane, false, n);
    if (lane == 0) store_lse(out, lse, row, st);
  }
}

// ---------------------------------------------------------------------------------------
// Forward, split path. Piece `part` of a row covers frame positions [part, part + 1) * kSpan
// of the row; program p of the 1-D grid is (row, part) = (p / parts, p % parts).

template <typename T>
__host__ __device__ constexpr int64_t forward_span() {
  return int64_t(kMaxRowThreads) * kForwardItems<T> * kPack<T>;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kMaxRowThreads)
    row_parts_kernel(const T* __restrict__ x, A* __restrict__ part_m, A* __restrict__ part_s,
                     int64_t rows, int64_t n, int64_t x_stride, int64_t parts) {
  constexpr int64_t kSpan = forward_span<T>();
  const int lane = static_cast<int>(threadIdx.x);
  for (GridWalk w(parts); w.q < rows; w.next()) {
    const int64_t row = w.q, part = w.r, p = row * parts + part;
    const T* xr = x + row * x_stride;
    const int64_t first = part * kSpan - pack_shift(xr);
    const int64_t count = (first + kSpan < n ? first + kSpan : n) - (first > 0 ? first : 0);
    ForwardPiece<T, A, kMaxRowThreads, kForwardItems<T>> piece;
    const RowState<A> st = piece.fold(xr, first, n, lane, false, count > 0 ? count : 0);
    if (lane == 0) {
      part_m[p] = st.m;
      part_s[p] = st.s;
    }
  }
}

constexpr int kMergeThreads = 256;

// One block per row merges the row's parts into its state (row_m, row_s); for logsumexp
// (out != nullptr) thread 0 also stores the result.
template <typename T, typename A>
__global__ void __launch_bounds__(kMergeThreads)
    merge_parts_kernel(const A* __restrict__ part_m, const A* __restrict__ part_s, int64_t rows,
                       int64_t parts, A* __restrict__ row_m, A* __restrict__ row_s,
                       T* __restrict__ out, double* __restrict__ lse) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    RowState<A> st = RowState<A>::empty();
    for (int64_t k = threadIdx.x; k < parts; k += kMergeThreads) {
      st = merge(st, RowState<A>{part_m[row * parts + k], part_s[row * parts + k]});
    }
    st = block_reduce<kMergeThreads>(st, Merge{});
    if (threadIdx.x == 0) {
      row_m[row] = st.m;
      row_s[row] = st.s;
      if (out != nullptr) store_lse(out, lse, row, st);
    }
  }
}

template <typename T, typename U, bool LOG>
__global__ void __launch_bounds__(kMaxRowThreads)
    softmax_finish_kernel(const T* __restrict__ x, U* __restrict__ y,
                          const acc_of<T, U>* __restrict__ row_m,
                          const acc_of<T, U>* __restrict__ row_s, int64_t rows, int64_t n,
                          int64_t x_stride, int64_t parts) {
  using A = acc_of<T, U>;
  constexpr int64_t kSpan = forward_span<T>();
  const int lane = static_cast<int>(threadIdx.x);
  for (GridWalk w(parts); w.q < rows; w.next()) {
    const int64_t row = w.q, part = w.r;
    const RowState<A> st{row_m[row], row_s[row]};
    const T* xr = x + row * x_stride;
    const int64_t first = part * kSpan - pack_shift(xr);
    ForwardPiece<T, A, kMaxRowThreads, kForwardItems<T>> piece;
    piece.load(xr, first, n, lane);
    piece.m = st.m;
    piece.exps(first, n, lane, LOG);
    piece.store(y + row * n, first, n, lane, LOG, softmax_scale(st), log_softmax_shift(st));
  }
}

// ---------------------------------------------------------------------------------------
// Strided rows: a block takes the rows (o, i0 .. i0 + TX) of outer block o, TX = blockDim.x
// neighbouring columns (contiguous in memory), and splits their length n over its
// blockDim.y = kStridedThreads / TX threads; program p is (o, tile) = (p / tiles, p % tiles).

struct StridedTile {
  int64_t o, i;  // outer block, column of this thread
  bool active;   // i < inner
};

// `w` walks (o, tile) over L.outer by the tiles of a row block (GridWalk(tiles)).
__device__ __forceinline__ StridedTile strided_tile(const GridWalk& w, const Layout& L) {
  const int64_t i = w.r * blockDim.x + threadIdx.x;
  return {w.q, i, i < L.inner};
}

// The merge of the blockDim.y values of each column (a state or a sum), in every thread of
// the column: lanes of a column within a warp by shuffles, then the warps through shared
// memory.
template <typename V, typename Op>
__device__ __forceinline__ V column_reduce_all(V v, Op op) {
  const unsigned tx = blockDim.x;  // a power of two <= 32
  for (unsigned offset = 16; offset >= tx; offset /= 2) {
    v = op(v, cub::ShuffleDown<32>(v, static_cast<int>(offset), 31, 0xffffffffu));
  }
  // Lanes < tx of each warp hold their column's merge over the warp.
  constexpr int kWarps = kStridedThreads / 32;
  __shared__ V partial[kWarps][32];
  __shared__ V total[32];
  const unsigned linear = threadIdx.y * tx + threadIdx.x, warp = linear / 32, lane = linear % 32;
  __syncthreads();  // the previous call's readers of `total` are done
  if (lane < tx) partial[warp][lane] = v;
  __syncthreads();
  if (linear < tx) {
    V acc = partial[0][linear];
    for (int w = 1; w < kWarps; ++w) acc = op(acc, partial[w][linear]);
    total[linear] = acc;
  }
  __syncthreads();
  return total[threadIdx.x];
}

// Calls use(j, x_j...) for this thread's elements j = threadIdx.y + k * blockDim.y < n of a
// column of each of `columns` (element j at column[j * inner]), issuing 16 bytes of loads per
// column before using them.
template <typename T, int COLUMNS, typename F>
__device__ __forceinline__ void for_column(const T* const (&columns)[COLUMNS], int64_t n,
                                           int64_t inner, F use) {
  constexpr int kUnroll = 16 / sizeof(T);
  const int64_t step = blockDim.y;
  int64_t j = threadIdx.y;
  for (; j + (kUnroll - 1) * step < n; j += kUnroll * step) {
    T v[COLUMNS][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int c = 0; c < COLUMNS; ++c) v[c][u] = columns[c][(j + u * step) * inner];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if constexpr (COLUMNS == 1) {
        use(j + u * step, v[0][u]);
      } else {
        use(j + u * step, v[0][u], v[1][u]);
      }
    }
  }
  for (; j < n; j += step) {
    if constexpr (COLUMNS == 1) {
      use(j, columns[0][j * inner]);
    } else {
      use(j, columns[0][j * inner], columns[1][j * inner]);
    }
  }
}

template <typename T, typename A>
__device__ __forceinline__ RowState<A> strided_state(const T* __restrict__ xc, int64_t n,
                                                     int64_t inner, bool active) {
  RowState<A> st = RowState<A>::empty();
  if (active) {
    const T* columns[1] = {xc};
    for_column(columns, n, inner, [&](int64_t, T v) { st.update(to_acc<A>(v)); });
  }
  return column_reduce_all(st, Merge{});
}

template <typename T, typename U>
__global__ void __launch_bounds__(kStridedThreads)
    softmax_strided_kernel(const T* __restrict__ x, U* __restrict__ y, Layout L, int64_t tiles,
                           bool log) {
  using A = acc_of<T, U>;
  for (GridWalk w(tiles); w.q < L.outer; w.next()) {
    const StridedTile t = strided_tile(w, L);
    const T* xc = x + t.o * L.x_stride + t.i;
    const RowState<A> st = strided_state<T, A>(xc, L.n, L.inner, t.active);
    if (!t.active) continue;
    const A scale = softmax_scale(st), shift = log_softmax_shift(st);
    U* yc = y + t.o * L.block() + t.i;
    const T* columns[1] = {xc};
    for_column(columns, L.n, L.inner, [&](int64_t j, T x_j) {
      const A v = to_acc<A>(x_j);
      yc[j * L.inner] = from_acc<U>(log ? (v - st.m) - shift : exp(v - st.m) * scale);
    });
  }
}

template <typename T>
__global__ void __launch_bounds__(kStridedThreads)
    logsumexp_strided_kernel(const T* __restrict__ x, T* __restrict__ out, double* __restrict__ lse,
                             Layout L, int64_t tiles) {
  using A = acc_of<T>;
  for (GridWalk w(tiles); w.q < L.outer; w.next()) {
    const StridedTile t = strided_tile(w, L);
    const RowState<A> st = strided_state<T, A>(x + t.o * L.x_stride + t.i, L.n, L.inner, t.active);
    if (t.active && threadIdx.y == 0) store_lse(out, lse, t.o * L.inner + t.i, st);
  }
}

// ---------------------------------------------------------------------------------------
// Backward. softmax: dx = y * (g - sum(g * y)); log_softmax: dx = g - exp(y) * sum(g)
// (backward_term, backward_value and BackwardPiece in common.cuh, shared with the masked
// backward of masked_softmax.cu).

template <typename T, typename U, int R, int ITEMS>
__global__ void __launch_bounds__(block_threads(R))
    backward_rows_kernel(const T* __restrict__ grad, const T* __restrict__ y, U* __restrict__ dx,
                         int64_t rows, int64_t n, bool log) {
  using A = acc_of<T, U>;
  constexpr int kRowsPerBlock = block_threads(R) / R;
  const int lane = static_cast<int>(threadIdx.x) % R;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / R; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t first = -pack_shift(grad + row * n);
    BackwardPiece<T, A, R, ITEMS> piece;
    const A total =
        group_reduce_all<R>(piece.load(grad + row * n, y + row * n, first, n, lane, log), Sum{});
    piece.store(dx + row * n, first, n, lane, total, log);
  }
}

template <typename T>
__host__ __device__ constexpr int64_t backward_span() {
  return int64_t(kMaxRowThreads) * kBackwardItems * kPack<T>;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kMaxRowThreads)
    backward_parts_kernel(const T* __restrict__ grad, const T* __restrict__ y,
                          A* __restrict__ partial, int64_t rows, int64_t n, int64_t parts,
                          bool log) {
  const int lane = static_cast<int>(threadIdx.x);
  for (GridWalk w(parts); w.q < rows; w.next()) {
    const int64_t row = w.q, part = w.r, p = row * parts + part;
    const int64_t first = part * backward_span<T>() - pack_shift(grad + row * n);
    BackwardPiece<T, A, kMaxRowThreads, kBackwardItems> piece;
    const A total = block_reduce<kMaxRowThreads>(
        piece.load(grad + row * n, y + row * n, first, n, lane, log), Sum{});
    if (lane == 0) partial[p] = total;
  }
}

template <typename A>
__global__ void __launch_bounds__(kMergeThreads)
    sum_parts_kernel(const A* __restrict__ partial, int64_t rows, int64_t parts,
                     A* __restrict__ row_total) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    A total = 0;
    for (int64_t k = threadIdx.x; k < parts; k += kMergeThreads) total += partial[row * parts + k];
    total = block_reduce<kMergeThreads>(total, Sum{});
    if (threadIdx.x == 0) row_total[row] = total;
  }
}

template <typename T, typename U>
__global__ void __launch_bounds__(kMaxRowThreads)
    backward_finish_kernel(const T* __restrict__ grad, const T* __restrict__ y, U* __restrict__ dx,
                           const acc_of<T, U>* __restrict__ row_total, int64_t rows, int64_t n,
                           int64_t parts, bool log) {
  using A = acc_of<T, U>;
  const int lane = static_cast<int>(threadIdx.x);
  for (GridWalk w(parts); w.q < rows; w.next()) {
    const int64_t row = w.q, part = w.r;
    const int64_t first = part * backward_span<T>() - pack_shift(grad + row * n);
    BackwardPiece<T, A, kMaxRowThreads, kBackwardItems> piece;
    piece.load(grad + row * n, y + row * n, first, n, lane, log);
    piece.store(dx + row * n, first, n, lane, row_total[row], log);
  }
}

template <typename T, typename U>
__global__ void __launch_bounds__(kStridedThreads)
    backward_strided_kernel(const T* __restrict__ grad, const T* __restrict__ y, U* __restrict__ dx,
                            Layout L, int64_t tiles, bool log) {
  using A = acc_of<T, U>;
  for (GridWalk w(tiles); w.q < L.outer; w.next()) {
    const StridedTile t = strided_tile(w, L);
    const int64_t base = t.o * L.block() + t.i;
    const T* columns[2] = {grad + base, y + base};
    A total = 0;
    if (t.active) {
      for_column(columns, L.n, L.inner, [&](int64_t, T g, T out) {
        total += backward_term(to_acc<A>(g), to_acc<A>(out), log);
      });
    }
    total = column_reduce_all(total, Sum{});
    if (!t.active) continue;
    for_column(columns, L.n, L.inner, [&](int64_t j, T g, T out) {
      dx[base + j * L.inner] =
          from_acc<U>(backward_value(to_acc<A>(g), to_acc<A>(out), total, log));
    });
  }
}

// logsumexp backward: dx = grad[r] * exp((x - hi[r]) - lo[r]), hi + lo the fp64 lse of row r
// split in A by the caller: x - hi is exact for the entries near lse, so the gradient keeps
// its precision at large offsets. Contiguous rows: a block per row, 16-byte packs.
constexpr int kMapThreads = 256;
constexpr int kMapItems = 4;

template <typename T>
__global__ void __launch_bounds__(kMapThreads)
    logsumexp_backward_kernel(const T* __restrict__ grad, int64_t grad_stride,
                              const double* __restrict__ lse, const T* __restrict__ x,
                              T* __restrict__ dx, int64_t rows, int64_t n, int64_t x_stride) {
  using A = acc_of<T>;
  constexpr int kVec = kPack<T>;
  constexpr int64_t kSpan = int64_t(kMapThreads) * kMapItems * kVec;
  const int lane = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    const LseSplit<A> split = split_lse<A>(lse[row]);
    const A g = to_acc<A>(grad[row * grad_stride]), h = split.hi, l = split.lo;
    for (int64_t first = -pack_shift(xr); first < n; first += kSpan) {
      Pack<T, kVec> p[kMapItems];
#pragma unroll
      for (int k = 0; k < kMapItems; ++k) {
        const int64_t j = slot<kMapThreads, kVec>(first, k, lane);
        if (j < n) p[k] = load_pack(xr, j, n, from_acc<T>(0.0f));
      }
#pragma unroll
      for (int k = 0; k < kMapItems; ++k) {
        const int64_t j = slot<kMapThreads, kVec>(first, k, lane);
        if (j < n) {
          A d[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) d[e] = g * exp((to_acc<A>(p[k].v[e]) - h) - l);
          store_values(dx + row * n, j, n, d);
        }
      }
    }
  }
}

// Strided rows: the tiles of the strided kernels; each thread's row terms are read once.
template <typename T>
__global__ void __launch_bounds__(kStridedThreads)
    logsumexp_backward_strided_kernel(const T* __restrict__ grad, int64_t grad_stride,
                                      const double* __restrict__ lse, const T* __restrict__ x,
                                      T* __restrict__ dx, Layout L, int64_t tiles) {
  using A = acc_of<T>;
  for (GridWalk w(tiles); w.q < L.outer; w.next()) {
    const StridedTile t = strided_tile(w, L);
    if (!t.active) continue;
    const int64_t row = t.o * L.inner + t.i;
    const LseSplit<A> split = split_lse<A>(lse[row]);
    const A g = to_acc<A>(grad[row * grad_stride]), h = split.hi, l = split.lo;
    const T* xc = x + t.o * L.x_stride + t.i;
    T* dc = dx + t.o * L.block() + t.i;
    const T* columns[1] = {xc};
    for_column(columns, L.n, L.inner, [&](int64_t j, T x_j) {
      dc[j * L.inner] = from_acc<T>(g * exp((to_acc<A>(x_j) - h) - l));
    });
  }
}

// ---------------------------------------------------------------------------------------
// Launch plans.

// Rows of n elements in groups of R threads holding ITEMS packs each: the smallest R (4 to
// kMaxRowThreads) that holds a row wherever its packs start, or 0 (the split path).
template <typename T>
int row_threads(int64_t n, int items, bool aligned_rows) {
  const int64_t packs = ceil_div(n + (aligned_rows ? 0 : kPack<T> - 1), int64_t(kPack<T>));
  for (int r = 4; r <= kMaxRowThreads; r *= 2) {
    if (int64_t(r) * items >= packs) return r;
  }
  return 0;
}

// Whether every row of x starts on a 16-byte boundary (then no row needs an extra pack).
template <typename T>
bool rows_aligned(const void* p, int64_t stride_elements) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride_elements % kPack<T> == 0;
}

template <typename T>
int64_t parts_of(int64_t n, int64_t span) {
  return ceil_div(n + kPack<T> - 1, span);  // room for any pack shift
}

template <int R>
unsigned row_blocks(int64_t rows) {
  return grid_size(ceil_div(rows, int64_t(block_threads(R) / R)));
}

// The strided kernels' block: TX neighbouring columns (a power of two up to 32) by
// kStridedThreads / TX threads along the row.
dim3 strided_block(int64_t inner) {
  unsigned tx = 1;
  while (tx < 32 && tx < inner) tx *= 2;
  return dim3(tx, kStridedThreads / tx);
}

int64_t strided_tiles(const Layout& L, dim3 block) {
  return ceil_div(L.inner, static_cast<int64_t>(block.x));
}

unsigned strided_blocks(const Layout& L, dim3 block) {
  return grid_size(L.outer * strided_tiles(L, block));
}

// The split path's first two kernels: the states of the `parts` pieces of every row, merged
// per row. The workspace holds the pieces' m and s', then the rows' (returned: row m, followed
// by row s'); out and lse, when given, get the logsumexp.
template <typename T, typename A>
A* split_row_states(const T* x, const Layout& L, int64_t parts, void* workspace, T* out,
                    double* lse, cudaStream_t s) {
  const int64_t rows = L.rows();
  A* part_m = static_cast<A*>(workspace);
  A* part_s = part_m + rows * parts;
  A* row_m = part_s + rows * parts;
  row_parts_kernel<T, A><<<grid_size(rows * parts), kMaxRowThreads, 0, s>>>(x, part_m, part_s, rows,
                                                                            L.n, L.x_stride, parts);
  merge_parts_kernel<T, A><<<grid_size(rows), kMergeThreads, 0, s>>>(part_m, part_s, rows, parts,
                                                                     row_m, row_m + rows, out, lse);
  return row_m;
}

template <typename T, typename U>
cudaError_t softmax_forward_typed(const T* x, U* y, const Layout& L, bool log, void* workspace,
                                  cudaStream_t s) {
  using A = acc_of<T, U>;
  const int64_t rows = L.rows();
  if (L.inner != 1) {
    const dim3 block = strided_block(L.inner);
    softmax_strided_kernel<T, U>
        <<<strided_blocks(L, block), block, 0, s>>>(x, y, L, strided_tiles(L, block), log);
    return cudaGetLastError();
  }
  const int r = row_threads<T>(L.n, kForwardItems<T>, rows_aligned<T>(x, L.x_stride));
  if (r == 0) {
    const int64_t parts = parts_of<T>(L.n, forward_span<T>());
    A* row_m = split_row_states<T, A>(x, L, parts, workspace, static_cast<T*>(nullptr), nullptr, s);
    A* row_s = row_m + rows;
    if (log) {
      softmax_finish_kernel<T, U, true><<<grid_size(rows * parts), kMaxRowThreads, 0, s>>>(
          x, y, row_m, row_s, rows, L.n, L.x_stride, parts);
    } else {
      softmax_finish_kernel<T, U, false><<<grid_size(rows * parts), kMaxRowThreads, 0, s>>>(
          x, y, row_m, row_s, rows, L.n, L.x_stride, parts);
    }
    return cudaGetLastError();
  }
  return with_row_threads(r, [&](auto threads) {
    constexpr int R = decltype(threads)::value;
    if (log) {
      softmax_rows_kernel<T, U, R, kForwardItems<T>, true>
          <<<row_blocks<R>(rows), block_threads(R), 0, s>>>(x, y, rows, L.n, L.x_stride);
    } else {
      softmax_rows_kernel<T, U, R, kForwardItems<T>, false>
          <<<row_blocks<R>(rows), block_threads(R), 0, s>>>(x, y, rows, L.n, L.x_stride);
    }
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t logsumexp_forward_typed(const T* x, T* out, double* lse, const Layout& L,
                                    void* workspace, cudaStream_t s) {
  using A = acc_of<T>;
  const int64_t rows = L.rows();
  if (L.inner != 1) {
    const dim3 block = strided_block(L.inner);
    logsumexp_strided_kernel<T>
        <<<strided_blocks(L, block), block, 0, s>>>(x, out, lse, L, strided_tiles(L, block));
    return cudaGetLastError();
  }
  const int r = row_threads<T>(L.n, kForwardItems<T>, rows_aligned<T>(x, L.x_stride));
  if (r == 0) {
    split_row_states<T, A>(x, L, parts_of<T>(L.n, forward_span<T>()), workspace, out, lse, s);
    return cudaGetLastError();
  }
  return with_row_threads(r, [&](auto threads) {
    constexpr int R = decltype(threads)::value;
    logsumexp_rows_kernel<T, R, kForwardItems<T>>
        <<<row_blocks<R>(rows), block_threads(R), 0, s>>>(x, out, lse, rows, L.n, L.x_stride);
    return cudaGetLastError();
  });
}

template <typename T, typename U>
cudaError_t softmax_backward_typed(const T* grad, const T* y, U* dx, const Layout& L, bool log,
                                   void* workspace, cudaStream_t s) {
  using A = acc_of<T, U>;
  const int64_t rows = L.rows();
  if (L.inner != 1) {
    const dim3 block = strided_block(L.inner);
    backward_strided_kernel<T, U>
        <<<strided_blocks(L, block), block, 0, s>>>(grad, y, dx, L, strided_tiles(L, block), log);
    return cudaGetLastError();
  }
  const int r = row_threads<T>(L.n, kBackwardItems, rows_aligned<T>(grad, L.n));
  if (r == 0) {
    const int64_t parts = parts_of<T>(L.n, backward_span<T>());
    A* partial = static_cast<A*>(workspace);
    A* row_total = partial + rows * parts;
    backward_parts_kernel<T, A><<<grid_size(rows * parts), kMaxRowThreads, 0, s>>>(
        grad, y, partial, rows, L.n, parts, log);
    sum_parts_kernel<A><<<grid_size(rows), kMergeThreads, 0, s>>>(partial, rows, parts, row_total);
    backward_finish_kernel<T, U><<<grid_size(rows * parts), kMaxRowThreads, 0, s>>>(
        grad, y, dx, row_total, rows, L.n, parts, log);
    return cudaGetLastError();
  }
  return with_row_threads(r, [&](auto threads) {
    constexpr int R = decltype(threads)::value;
    backward_rows_kernel<T, U, R, kBackwardItems>
        <<<row_blocks<R>(rows), block_threads(R), 0, s>>>(grad, y, dx, rows, L.n, log);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t logsumexp_backward_typed(const T* grad, int64_t grad_stride, const double* lse,
                                     const T* x, T* dx, const Layout& L, cudaStream_t s) {
  if (L.inner != 1) {
    const dim3 block = strided_block(L.inner);
    logsumexp_backward_strided_kernel<T><<<strided_blocks(L, block), block, 0, s>>>(
        grad, grad_stride, lse, x, dx, L, strided_tiles(L, block));
  } else {
    logsumexp_backward_kernel<T><<<grid_size(L.rows()), kMapThreads, 0, s>>>(
        grad, grad_stride, lse, x, dx, L.rows(), L.n, L.x_stride);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

size_t workspace_bytes(const Layout& L, Dtype in, Dtype out) {
  // The split paths' per-piece and per-row values: two arrays of each forward (m and s'), one
  // backward. Sized for the shorter backward pieces, whichever pass asks.
  if (L.inner != 1) return 0;
  const int64_t vec = 16 / static_cast<int64_t>(detail::element_size(in));  // kPack of in
  const int64_t span = int64_t(detail::kMaxRowThreads) * detail::kBackwardItems * vec;
  if (L.n + vec - 1 <= span) return 0;
  const int64_t parts = detail::ceil_div(L.n + vec - 1, span);
  return static_cast<size_t>(2 * (L.rows() * parts + L.rows())) *
         detail::element_size(accumulation(in, out));
}

cudaError_t softmax_forward(const void* x, Dtype x_type, void* y, Dtype y_type, const Layout& L,
                            bool log, void* workspace, cudaStream_t stream) {
  return detail::with_pair(x_type, y_type, [&](auto xt, auto yt) {
    using T = decltype(xt);
    using U = decltype(yt);
    return detail::softmax_forward_typed(static_cast<const T*>(x), static_cast<U*>(y), L, log,
                                         workspace, stream);
  });
}

cudaError_t logsumexp_forward(const void* x, Dtype x_type, void* out, double* lse, const Layout& L,
                              void* workspace, cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) {
    using T = decltype(xt);
    return detail::logsumexp_forward_typed(static_cast<const T*>(x), static_cast<T*>(out), lse, L,
                                           workspace, stream);
  });
}

cudaError_t softmax_backward(const void* grad, const void* y, Dtype y_type, void* dx, Dtype dx_type,
                             const Layout& L, bool log, void* workspace, cudaStream_t stream) {
  return detail::with_pair(y_type, dx_type, [&](auto yt, auto dt) {
    using T = decltype(yt);
    using U = decltype(dt);
    return detail::softmax_backward_typed(static_cast<const T*>(grad), static_cast<const T*>(y),
                                          static_cast<U*>(dx), L, log, workspace, stream);
  });
}

cudaError_t logsumexp_backward(const void* grad, int64_t grad_stride, const double* lse,
                               const void* x, Dtype x_type, void* dx, const Layout& L,
                               cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) -> cudaError_t {
    using T = decltype(xt);
    return detail::logsumexp_backward_typed<T>(static_cast<const T*>(grad), grad_stride, lse,
                                               static_cast<const T*>(x), static_cast<T*>(dx), L,
                                               stream);
  });
}

}  // namespace stablekernels::cuda
