// CUDA kernels: softmax, log_softmax and logsumexp, forward and backward (numerics contract
// of docs/design.md; stablekernels/online_softmax.h). No torch header.
//
// By row length, for contiguous rows (inner == 1):
//  - warp kernel: one warp per row, several rows per block, the row in registers (up to
//    kWarpPacks 16-byte packs per lane, or 32 single elements per lane when rows are not
//    16-byte aligned);
//  - block kernel: one block of kBlockThreads per row, the row in registers (kBlockPacks per
//    thread): each element read once and written once;
//  - split path, rows longer than a block holds: each block computes the (m, s') of its
//    chunk into a workspace; a second kernel merges the row's parts and normalises its chunk
//    (x read twice; logsumexp reads it once).
// Each thread folds its elements into (m, s') one by one (RowState::update: one exp per
// element), then states merge across the warp and the block by the merge rule (cub's
// WarpReduce: a shuffle tree per warp, then one over the warps; common.cuh).
// Strided rows (inner > 1): one thread per row, neighbouring threads on neighbouring rows, so
// every load of a warp is contiguous.
#include "common.cuh"

namespace stablekernels::cuda {
namespace detail {
namespace {

constexpr int kWarpRows = 4;         // rows per block of the warp kernel
constexpr int kWarpPacks = 8;        // 16-byte packs per lane in the warp kernel
constexpr int kWarpScalars = 32;     // elements per lane when unaligned
constexpr int kBlockThreads = 1024;  // threads per row of the block kernel
constexpr int kBlockPacks = 8;       // 16-byte packs per thread in the block kernel
constexpr int kBlockScalars = 8;     // elements per thread when unaligned
constexpr int kStridedThreads = 256;

// ---------------------------------------------------------------------------------------
// A tile of one row held by THREADS threads (LANES == 32 for a warp), ITEMS packs of VEC
// elements each; element (k, e) of thread t is at ((k * LANES + t) * VEC + e).

template <typename T, typename A, int LANES, int ITEMS, int VEC>
struct Tile {
  A v[ITEMS][VEC];

  // Loads x[0, len) (len a multiple of VEC, x aligned to the pack) and folds it in.
  __device__ __forceinline__ RowState<A> load(const T* x, int64_t len, int lane) {
    RowState<A> st = RowState<A>::empty();
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t at = (static_cast<int64_t>(k) * LANES + lane) * VEC;
      if (at < len) {
        const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(x + at);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[k][e] = to_acc<A>(p.v[e]);
          st.update(v[k][e]);
        }
      }
    }
    return st;
  }

  template <typename U, typename F>
  __device__ __forceinline__ void store(U* y, int64_t len, int lane, F f) const {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t at = (static_cast<int64_t>(k) * LANES + lane) * VEC;
      if (at < len) {
        Pack<U, VEC> p;
#pragma unroll
        for (int e = 0; e < VEC; ++e) p.v[e] = from_acc<U>(f(v[k][e]));
        *reinterpret_cast<Pack<U, VEC>*>(y + at) = p;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Forward, rows in registers.

template <typename T, typename U, int ITEMS, int VEC>
__global__ void __launch_bounds__(32 * kWarpRows)
    softmax_warp_kernel(const T* __restrict__ x, U* __restrict__ y, int64_t rows, int64_t n,
                        int64_t x_stride, bool log) {
  using A = acc_of<T, U>;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRows + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpRows) {
    Tile<T, A, 32, ITEMS, VEC> tile;
    const RowState<A> st = warp_reduce_all(tile.load(x + row * x_stride, n, threadIdx.x), Merge{});
    const A log_sum = log1p(st.s);
    tile.store(y + row * n, n, threadIdx.x,
               [&](A v) { return softmax_value(v, st, log, log_sum); });
  }
}

template <typename T, typename U, int ITEMS, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_block_kernel(const T* __restrict__ x, U* __restrict__ y, int64_t rows, int64_t n,
                         int64_t x_stride, bool log) {
  using A = acc_of<T, U>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    Tile<T, A, kBlockThreads, ITEMS, VEC> tile;
    const RowState<A> st =
        block_reduce_all<kBlockThreads>(tile.load(x + row * x_stride, n, threadIdx.x), Merge{});
    const A log_sum = log1p(st.s);
    tile.store(y + row * n, n, threadIdx.x,
               [&](A v) { return softmax_value(v, st, log, log_sum); });
  }
}

// ---------------------------------------------------------------------------------------
// Forward, split path: chunk `part` of row `row` is grid (part, row).

template <typename T, typename A, int ITEMS, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    row_parts_kernel(const T* __restrict__ x, A* __restrict__ part_m, A* __restrict__ part_s,
                     int64_t rows, int64_t n, int64_t x_stride, int64_t parts) {
  constexpr int64_t kChunk = int64_t(kBlockThreads) * ITEMS * VEC;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t begin = blockIdx.x * kChunk;
    const int64_t len = n - begin < kChunk ? n - begin : kChunk;
    Tile<T, A, kBlockThreads, ITEMS, VEC> tile;
    const RowState<A> st = block_reduce<kBlockThreads>(
        tile.load(x + row * x_stride + begin, len, threadIdx.x), Merge{});
    if (threadIdx.x == 0) {
      part_m[row * parts + blockIdx.x] = st.m;
      part_s[row * parts + blockIdx.x] = st.s;
    }
  }
}

// The merged state of a row's parts, in every thread of the block.
template <typename A>
__device__ __forceinline__ RowState<A> row_total(const A* part_m, const A* part_s, int64_t row,
                                                 int64_t parts) {
  RowState<A> st = RowState<A>::empty();
  for (int64_t k = threadIdx.x; k < parts; k += kBlockThreads) {
    st = merge(st, RowState<A>{part_m[row * parts + k], part_s[row * parts + k]});
  }
  return block_reduce_all<kBlockThreads>(st, Merge{});
}

template <typename T, typename U, int ITEMS, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_finish_kernel(const T* __restrict__ x, U* __restrict__ y,
                          const acc_of<T, U>* __restrict__ part_m,
                          const acc_of<T, U>* __restrict__ part_s, int64_t rows, int64_t n,
                          int64_t x_stride, int64_t parts, bool log) {
  using A = acc_of<T, U>;
  constexpr int64_t kChunk = int64_t(kBlockThreads) * ITEMS * VEC;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const RowState<A> st = row_total(part_m, part_s, row, parts);
    const A log_sum = log1p(st.s);
    const int64_t begin = blockIdx.x * kChunk;
    const int64_t len = n - begin < kChunk ? n - begin : kChunk;
    Tile<T, A, kBlockThreads, ITEMS, VEC> tile;
    tile.load(x + row * x_stride + begin, len, threadIdx.x);
    tile.store(y + row * n + begin, len, threadIdx.x,
               [&](A v) { return softmax_value(v, st, log, log_sum); });
  }
}

// ---------------------------------------------------------------------------------------
// Forward, strided rows: thread per row.

template <typename T, typename A>
__device__ __forceinline__ RowState<A> strided_stats(const T* x, int64_t n, int64_t inner) {
  RowState<A> st = RowState<A>::empty();
  for (int64_t j = 0; j < n; ++j) st.update(to_acc<A>(x[j * inner]));
  return st;
}

template <typename T, typename U>
__global__ void __launch_bounds__(kStridedThreads)
    softmax_strided_kernel(const T* __restrict__ x, U* __restrict__ y, Layout L, bool log) {
  using A = acc_of<T, U>;
  const int64_t rows = L.rows();
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = row / L.inner, i = row % L.inner;
    const T* xr = x + o * L.x_stride + i;
    U* yr = y + o * L.block() + i;
    const RowState<A> st = strided_stats<T, A>(xr, L.n, L.inner);
    const A log_sum = log1p(st.s);
    for (int64_t j = 0; j < L.n; ++j) {
      yr[j * L.inner] = from_acc<U>(softmax_value(to_acc<A>(xr[j * L.inner]), st, log, log_sum));
    }
  }
}

// ---------------------------------------------------------------------------------------
// logsumexp forward: the same statistics, one value per row.

// lse in fp64 (the float state's m kept exactly), out in x's dtype (rounded once from A).
template <typename T, typename A>
__device__ __forceinline__ void store_lse(T* out, double* lse, int64_t row, RowState<A> st) {
  const double value = finish_lse<double>(st);
  lse[row] = value;
  out[row] = from_acc<T>(static_cast<A>(value));
}

template <typename T, int ITEMS, int VEC>
__global__ void __launch_bounds__(32 * kWarpRows)
    logsumexp_warp_kernel(const T* __restrict__ x, T* __restrict__ out, double* __restrict__ lse,
                          int64_t rows, int64_t n, int64_t x_stride) {
  using A = acc_of<T>;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRows + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpRows) {
    Tile<T, A, 32, ITEMS, VEC> tile;
    const RowState<A> st = warp_reduce(tile.load(x + row * x_stride, n, threadIdx.x), Merge{});
    if (threadIdx.x == 0) store_lse(out, lse, row, st);
  }
}

template <typename T, int ITEMS, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    logsumexp_block_kernel(const T* __restrict__ x, T* __restrict__ out, double* __restrict__ lse,
                           int64_t rows, int64_t n, int64_t x_stride) {
  using A = acc_of<T>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    Tile<T, A, kBlockThreads, ITEMS, VEC> tile;
    const RowState<A> st =
        block_reduce<kBlockThreads>(tile.load(x + row * x_stride, n, threadIdx.x), Merge{});
    if (threadIdx.x == 0) store_lse(out, lse, row, st);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    logsumexp_finish_kernel(const acc_of<T>* __restrict__ part_m,
                            const acc_of<T>* __restrict__ part_s, T* __restrict__ out,
                            double* __restrict__ lse, int64_t rows, int64_t parts) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const auto st = row_total(part_m, part_s, row, parts);
    if (threadIdx.x == 0) store_lse(out, lse, row, st);
  }
}

template <typename T>
__global__ void __launch_bounds__(kStridedThreads)
    logsumexp_strided_kernel(const T* __restrict__ x, T* __restrict__ out, double* __restrict__ lse,
                             Layout L) {
  using A = acc_of<T>;
  const int64_t rows = L.rows();
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = row / L.inner, i = row % L.inner;
    store_lse(out, lse, row, strided_stats<T, A>(x + o * L.x_stride + i, L.n, L.inner));
  }
}

// ---------------------------------------------------------------------------------------
// Backward. softmax: dx = y * (g - sum(g * y)); log_softmax: dx = g - exp(y) * sum(g).

template <typename A>
__device__ __forceinline__ A backward_term(A g, A y, bool log) {
  return log ? g : g * y;
}

template <typename A>
__device__ __forceinline__ A backward_value(A g, A y, A total, bool log) {
  return log ? g - exp(y) * total : y * (g - total);
}

// grad and y of one row tile, in registers.
template <typename T, typename A, int LANES, int ITEMS, int VEC>
struct GradTile {
  A g[ITEMS][VEC], y[ITEMS][VEC];

  __device__ __forceinline__ A load(const T* grad, const T* out, int64_t len, int lane, bool log) {
    A total = 0;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t at = (static_cast<int64_t>(k) * LANES + lane) * VEC;
      if (at < len) {
        const Pack<T, VEC> pg = *reinterpret_cast<const Pack<T, VEC>*>(grad + at);
        const Pack<T, VEC> py = *reinterpret_cast<const Pack<T, VEC>*>(out + at);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[k][e] = to_acc<A>(pg.v[e]);
          y[k][e] = to_acc<A>(py.v[e]);
          total += backward_term(g[k][e], y[k][e], log);
        }
      }
    }
    return total;
  }

  template <typename U>
  __device__ __forceinline__ void store(U* dx, int64_t len, int lane, A total, bool log) const {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t at = (static_cast<int64_t>(k) * LANES + lane) * VEC;
      if (at < len) {
        Pack<U, VEC> p;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          p.v[e] = from_acc<U>(backward_value(g[k][e], y[k][e], total, log));
        *reinterpret_cast<Pack<U, VEC>*>(dx + at) = p;
      }
    }
  }
};

template <typename T, typename U, int ITEMS, int VEC>
__global__ void __launch_bounds__(32 * kWarpRows)
    backward_warp_kernel(const T* __restrict__ grad, const T* __restrict__ y, U* __restrict__ dx,
                         int64_t rows, int64_t n, bool log) {
  using A = acc_of<T, U>;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRows + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpRows) {
    GradTile<T, A, 32, ITEMS, VEC> tile;
    const A total =
        warp_reduce_all(tile.load(grad + row * n, y + row * n, n, threadIdx.x, log), Sum{});
    tile.store(dx + row * n, n, threadIdx.x, total, log);
  }
}

template <typename T, typename U, int ITEMS, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    backward_block_kernel(const T* __restrict__ grad, const T* __restrict__ y, U* __restrict__ dx,
                          int64_t rows, int64_t n, bool log) {
  using A = acc_of<T, U>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    GradTile<T, A, kBlockThreads, ITEMS, VEC> tile;
    const A total = block_reduce_all<kBlockThreads>(
        tile.load(grad + row * n, y + row * n, n, threadIdx.x, log), Sum{});
    tile.store(dx + row * n, n, threadIdx.x, total, log);
  }
}

template <typename T, typename A, int ITEMS, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    backward_parts_kernel(const T* __restrict__ grad, const T* __restrict__ y,
                          A* __restrict__ partial, int64_t rows, int64_t n, int64_t parts,
                          bool log) {
  constexpr int64_t kChunk = int64_t(kBlockThreads) * ITEMS * VEC;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t begin = row * n + blockIdx.x * kChunk;
    const int64_t len = n - blockIdx.x * kChunk < kChunk ? n - blockIdx.x * kChunk : kChunk;
    GradTile<T, A, kBlockThreads, ITEMS, VEC> tile;
    const A total = block_reduce<kBlockThreads>(
        tile.load(grad + begin, y + begin, len, threadIdx.x, log), Sum{});
    if (threadIdx.x == 0) partial[row * parts + blockIdx.x] = total;
  }
}

template <typename T, typename U, int ITEMS, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    backward_finish_kernel(const T* __restrict__ grad, const T* __restrict__ y, U* __restrict__ dx,
                           const acc_of<T, U>* __restrict__ partial, int64_t rows, int64_t n,
                           int64_t parts, bool log) {
  using A = acc_of<T, U>;
  constexpr int64_t kChunk = int64_t(kBlockThreads) * ITEMS * VEC;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    A total = 0;
    for (int64_t k = threadIdx.x; k < parts; k += kBlockThreads) total += partial[row * parts + k];
    total = block_reduce_all<kBlockThreads>(total, Sum{});
    const int64_t begin = row * n + blockIdx.x * kChunk;
    const int64_t len = n - blockIdx.x * kChunk < kChunk ? n - blockIdx.x * kChunk : kChunk;
    GradTile<T, A, kBlockThreads, ITEMS, VEC> tile;
    tile.load(grad + begin, y + begin, len, threadIdx.x, log);
    tile.store(dx + begin, len, threadIdx.x, total, log);
  }
}

template <typename T, typename U>
__global__ void __launch_bounds__(kStridedThreads)
    backward_strided_kernel(const T* __restrict__ grad, const T* __restrict__ y, U* __restrict__ dx,
                            Layout L, bool log) {
  using A = acc_of<T, U>;
  const int64_t rows = L.rows();
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = (row / L.inner) * L.block() + row % L.inner;
    A total = 0;
    for (int64_t j = 0; j < L.n; ++j) {
      const int64_t at = base + j * L.inner;
      total += backward_term(to_acc<A>(grad[at]), to_acc<A>(y[at]), log);
    }
    for (int64_t j = 0; j < L.n; ++j) {
      const int64_t at = base + j * L.inner;
      dx[at] = from_acc<U>(backward_value(to_acc<A>(grad[at]), to_acc<A>(y[at]), total, log));
    }
  }
}

// dx = grad[r] * exp((x - hi[r]) - lo[r]), hi + lo the fp64 lse of row r split in A by the
// caller: x - hi is exact for the entries near lse, so the gradient keeps its precision at
// large offsets.
template <typename T>
__global__ void __launch_bounds__(256)
    logsumexp_backward_kernel(const acc_of<T>* __restrict__ grad, const acc_of<T>* __restrict__ hi,
                              const acc_of<T>* __restrict__ lo, const T* __restrict__ x,
                              T* __restrict__ dx, Layout L) {
  using A = acc_of<T>;
  const int64_t total = L.outer * L.block();
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = e / L.block(), rest = e % L.block();
    const int64_t j = rest / L.inner, i = rest % L.inner;
    const int64_t row = o * L.inner + i;
    const A v = to_acc<A>(x[o * L.x_stride + j * L.inner + i]);
    dx[e] = from_acc<T>(grad[row] * exp((v - hi[row]) - lo[row]));
  }
}

// ---------------------------------------------------------------------------------------
// Launch plans.

enum class Plan {
  kWarpPacks,
  kWarpScalars,
  kBlockPacks,
  kBlockScalars,
  kSplitPacks,
  kSplitScalars,
  kStrided
};

template <typename T>
bool aligned(const void* p, int64_t stride_elements, int64_t n) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride_elements % kPack<T> == 0 &&
         n % kPack<T> == 0;
}

template <typename T>
Plan plan_for(const Layout& L, bool aligned_rows) {
  if (L.inner != 1) return Plan::kStrided;
  const int64_t warp_capacity = aligned_rows ? 32 * kWarpPacks * kPack<T> : 32 * kWarpScalars;
  const int64_t block_capacity = aligned_rows ? int64_t(kBlockThreads) * kBlockPacks * kPack<T>
                                              : kBlockThreads * kBlockScalars;
  if (L.n <= warp_capacity) return aligned_rows ? Plan::kWarpPacks : Plan::kWarpScalars;
  if (L.n <= block_capacity) return aligned_rows ? Plan::kBlockPacks : Plan::kBlockScalars;
  return aligned_rows ? Plan::kSplitPacks : Plan::kSplitScalars;
}

template <typename T>
int64_t chunk_of(Plan plan) {
  return plan == Plan::kSplitPacks ? int64_t(kBlockThreads) * kBlockPacks * kPack<T>
                                   : int64_t(kBlockThreads) * kBlockScalars;
}

dim3 split_grid(int64_t parts, int64_t rows) {
  return dim3(static_cast<unsigned>(parts), static_cast<unsigned>(rows < 65535 ? rows : 65535));
}

const dim3 kWarpBlock(32, kWarpRows);

template <typename T, typename U>
cudaError_t softmax_forward_typed(const T* x, U* y, const Layout& L, bool log, void* workspace,
                                  cudaStream_t s) {
  using A = acc_of<T, U>;
  const int64_t rows = L.rows();
  const Plan plan = plan_for<T>(L, aligned<T>(x, L.x_stride, L.n) && aligned<U>(y, L.n, L.n));
  switch (plan) {
    case Plan::kWarpPacks:
      softmax_warp_kernel<T, U, kWarpPacks, kPack<T>>
          <<<grid_size(ceil_div(rows, kWarpRows)), kWarpBlock, 0, s>>>(x, y, rows, L.n, L.x_stride,
                                                                       log);
      break;
    case Plan::kWarpScalars:
      softmax_warp_kernel<T, U, kWarpScalars, 1>
          <<<grid_size(ceil_div(rows, kWarpRows)), kWarpBlock, 0, s>>>(x, y, rows, L.n, L.x_stride,
                                                                       log);
      break;
    case Plan::kBlockPacks:
      softmax_block_kernel<T, U, kBlockPacks, kPack<T>>
          <<<grid_size(rows), kBlockThreads, 0, s>>>(x, y, rows, L.n, L.x_stride, log);
      break;
    case Plan::kBlockScalars:
      softmax_block_kernel<T, U, kBlockScalars, 1>
          <<<grid_size(rows), kBlockThreads, 0, s>>>(x, y, rows, L.n, L.x_stride, log);
      break;
    case Plan::kSplitPacks:
    case Plan::kSplitScalars: {
      const int64_t parts = ceil_div(L.n, chunk_of<T>(plan));
      A* part_m = static_cast<A*>(workspace);
      A* part_s = part_m + rows * parts;
      const dim3 grid = split_grid(parts, rows);
      if (plan == Plan::kSplitPacks) {
        row_parts_kernel<T, A, kBlockPacks, kPack<T>>
            <<<grid, kBlockThreads, 0, s>>>(x, part_m, part_s, rows, L.n, L.x_stride, parts);
        softmax_finish_kernel<T, U, kBlockPacks, kPack<T>><<<grid, kBlockThreads, 0, s>>>(
            x, y, part_m, part_s, rows, L.n, L.x_stride, parts, log);
      } else {
        row_parts_kernel<T, A, kBlockScalars, 1>
            <<<grid, kBlockThreads, 0, s>>>(x, part_m, part_s, rows, L.n, L.x_stride, parts);
        softmax_finish_kernel<T, U, kBlockScalars, 1><<<grid, kBlockThreads, 0, s>>>(
            x, y, part_m, part_s, rows, L.n, L.x_stride, parts, log);
      }
      break;
    }
    case Plan::kStrided:
      softmax_strided_kernel<T, U>
          <<<grid_size(ceil_div(rows, kStridedThreads)), kStridedThreads, 0, s>>>(x, y, L, log);
      break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t logsumexp_forward_typed(const T* x, T* out, double* lse, const Layout& L,
                                    void* workspace, cudaStream_t s) {
  using A = acc_of<T>;
  const int64_t rows = L.rows();
  const Plan plan = plan_for<T>(L, aligned<T>(x, L.x_stride, L.n));
  switch (plan) {
    case Plan::kWarpPacks:
      logsumexp_warp_kernel<T, kWarpPacks, kPack<T>>
          <<<grid_size(ceil_div(rows, kWarpRows)), kWarpBlock, 0, s>>>(x, out, lse, rows, L.n,
                                                                       L.x_stride);
      break;
    case Plan::kWarpScalars:
      logsumexp_warp_kernel<T, kWarpScalars, 1>
          <<<grid_size(ceil_div(rows, kWarpRows)), kWarpBlock, 0, s>>>(x, out, lse, rows, L.n,
                                                                       L.x_stride);
      break;
    case Plan::kBlockPacks:
      logsumexp_block_kernel<T, kBlockPacks, kPack<T>>
          <<<grid_size(rows), kBlockThreads, 0, s>>>(x, out, lse, rows, L.n, L.x_stride);
      break;
    case Plan::kBlockScalars:
      logsumexp_block_kernel<T, kBlockScalars, 1>
          <<<grid_size(rows), kBlockThreads, 0, s>>>(x, out, lse, rows, L.n, L.x_stride);
      break;
    case Plan::kSplitPacks:
    case Plan::kSplitScalars: {
      const int64_t parts = ceil_div(L.n, chunk_of<T>(plan));
      A* part_m = static_cast<A*>(workspace);
      A* part_s = part_m + rows * parts;
      if (plan == Plan::kSplitPacks) {
        row_parts_kernel<T, A, kBlockPacks, kPack<T>>
            <<<split_grid(parts, rows), kBlockThreads, 0, s>>>(x, part_m, part_s, rows, L.n,
                                                               L.x_stride, parts);
      } else {
        row_parts_kernel<T, A, kBlockScalars, 1><<<split_grid(parts, rows), kBlockThreads, 0, s>>>(
            x, part_m, part_s, rows, L.n, L.x_stride, parts);
      }
      logsumexp_finish_kernel<T>
          <<<grid_size(rows), kBlockThreads, 0, s>>>(part_m, part_s, out, lse, rows, parts);
      break;
    }
    case Plan::kStrided:
      logsumexp_strided_kernel<T>
          <<<grid_size(ceil_div(rows, kStridedThreads)), kStridedThreads, 0, s>>>(x, out, lse, L);
      break;
  }
  return cudaGetLastError();
}

template <typename T, typename U>
cudaError_t softmax_backward_typed(const T* grad, const T* y, U* dx, const Layout& L, bool log,
                                   void* workspace, cudaStream_t s) {
  using A = acc_of<T, U>;
  const int64_t rows = L.rows();
  const bool packs =
      aligned<T>(grad, L.n, L.n) && aligned<T>(y, L.n, L.n) && aligned<U>(dx, L.n, L.n);
  const Plan plan = plan_for<T>(L, packs);
  switch (plan) {
    case Plan::kWarpPacks:
      backward_warp_kernel<T, U, kWarpPacks, kPack<T>>
          <<<grid_size(ceil_div(rows, kWarpRows)), kWarpBlock, 0, s>>>(grad, y, dx, rows, L.n, log);
      break;
    case Plan::kWarpScalars:
      backward_warp_kernel<T, U, kWarpScalars, 1>
          <<<grid_size(ceil_div(rows, kWarpRows)), kWarpBlock, 0, s>>>(grad, y, dx, rows, L.n, log);
      break;
    case Plan::kBlockPacks:
      backward_block_kernel<T, U, kBlockPacks, kPack<T>>
          <<<grid_size(rows), kBlockThreads, 0, s>>>(grad, y, dx, rows, L.n, log);
      break;
    case Plan::kBlockScalars:
      backward_block_kernel<T, U, kBlockScalars, 1>
          <<<grid_size(rows), kBlockThreads, 0, s>>>(grad, y, dx, rows, L.n, log);
      break;
    case Plan::kSplitPacks:
    case Plan::kSplitScalars: {
      const int64_t parts = ceil_div(L.n, chunk_of<T>(plan));
      A* partial = static_cast<A*>(workspace);
      const dim3 grid = split_grid(parts, rows);
      if (plan == Plan::kSplitPacks) {
        backward_parts_kernel<T, A, kBlockPacks, kPack<T>>
            <<<grid, kBlockThreads, 0, s>>>(grad, y, partial, rows, L.n, parts, log);
        backward_finish_kernel<T, U, kBlockPacks, kPack<T>>
            <<<grid, kBlockThreads, 0, s>>>(grad, y, dx, partial, rows, L.n, parts, log);
      } else {
        backward_parts_kernel<T, A, kBlockScalars, 1>
            <<<grid, kBlockThreads, 0, s>>>(grad, y, partial, rows, L.n, parts, log);
        backward_finish_kernel<T, U, kBlockScalars, 1>
            <<<grid, kBlockThreads, 0, s>>>(grad, y, dx, partial, rows, L.n, parts, log);
      }
      break;
    }
    case Plan::kStrided:
      backward_strided_kernel<T, U>
          <<<grid_size(ceil_div(rows, kStridedThreads)), kStridedThreads, 0, s>>>(grad, y, dx, L,
                                                                                  log);
      break;
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

size_t workspace_bytes(const Layout& L, Dtype in, Dtype out) {
  // Rows split only when longer than a block holds, and the unaligned plan's chunk is the
  // smallest (most parts): room for two per-part arrays (m and s', or the partial sums).
  const int64_t chunk = int64_t(detail::kBlockThreads) * detail::kBlockScalars;
  if (L.inner != 1 || L.n <= chunk) return 0;
  const int64_t parts = detail::ceil_div(L.n, chunk);
  return static_cast<size_t>(2 * L.rows() * parts) * detail::element_size(accumulation(in, out));
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

cudaError_t logsumexp_backward(const void* grad, const void* hi, const void* lo, const void* x,
                               Dtype x_type, void* dx, const Layout& L, cudaStream_t stream) {
  return detail::with_pair(x_type, x_type, [&](auto xt, auto) -> cudaError_t {
    using T = decltype(xt);
    using A = acc_of<T>;
    detail::logsumexp_backward_kernel<T>
        <<<detail::grid_size(detail::ceil_div(L.outer * L.block(), 256)), 256, 0, stream>>>(
            static_cast<const A*>(grad), static_cast<const A*>(hi), static_cast<const A*>(lo),
            static_cast<const T*>(x), static_cast<T*>(dx), L);
    return cudaGetLastError();
  });
}

}  // namespace stablekernels::cuda
