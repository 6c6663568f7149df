// Row statistics of the CPU kernels and the drivers that spread rows over threads: block
// sums into a double (BlockTotal, BlockSum), the (m, s') of a chunk (chunk_stats, its two
// passes) and of a contiguous segment (segment_stats), rows or segments of rows over threads
// (run_rows), and the strided tiles (run_columns) with their per-row (m, s') (column_stats).
// Part of kernels_impl.h, compiled once per CPU capability: it opens that file's namespace
// (one copy per capability) and is not compiled on its own.

#pragma once

#ifndef SK_CAPABILITY_NAMESPACE
#error "this header is part of kernels_impl.h: include that, with SK_CAPABILITY_NAMESPACE set"
#endif

#include <ATen/Parallel.h>
#include <ATen/ceil_div.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <stablekernels/online_softmax.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "load_store.h"
#include "vec_math.h"

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

constexpr int64_t kChunk = 16384;          // elements per chunk of the row statistics
constexpr int64_t kBlock = 16;             // vectors summed in fp32 before joining the double
constexpr int64_t kGrainElements = 32768;  // at least this many elements per parallel task
constexpr int64_t kSplitMin = 65536;       // shortest segment of a row split across threads

using at::ceil_div;
using State = RowState<double>;

// The running total of a row's block sums. With float inputs a block is an fp32 sum and a
// plain double total adds nothing measurable to its rounding. With double inputs the blocks
// are double already, and a plain total would err by up to one rounding per block: its
// error would grow with the number of blocks, so with the row length over the vector width
// and the thread count (1 thread, AVX2, 300000 columns: 4687 blocks, a log_softmax backward
// 9x less accurate than torch's). There it is compensated (Neumaier): the total errs by a
// few roundings however many blocks are added, on every capability and thread count.
// Compensation stops once the total is not finite, which then propagates as a plain sum.
template <typename acc_t>
struct BlockTotal {
  double sum = 0, carry = 0;
  void add(double v) {
    const double t = sum + v;
    if constexpr (std::is_same_v<acc_t, double>) {
      if (std::isfinite(t)) carry += std::fabs(sum) >= std::fabs(v) ? (sum - t) + v : (v - t) + sum;
    }
    sum = t;
  }
  double value() const { return carry != 0 && std::isfinite(sum) ? sum + carry : sum; }
};

// Adds kBlock-sized fp32 partial sums into a double, lane by lane or in total.
template <typename acc_t>
struct BlockSum {
  using V = Vectorized<acc_t>;
  V block = V(acc_t(0));
  int64_t count = 0;
  BlockTotal<acc_t> total;
  void add(V v) {
    block += v;
    if (++count == kBlock) flush();
  }
  void flush() {
    total.add(hsum(block));
    block = V(acc_t(0));
    count = 0;
  }
  double result() {
    flush();
    return total.value();
  }
};

// ---------------------------------------------------------------------------------------
// Row statistics (m, s') of a chunk, and of a contiguous segment chunk by chunk.
//
// Pass 1 takes the chunk's max m, whether it holds a NaN (then s' = NaN and pass 2 is
// skipped), and a block of kBlock vectors where m is. Pass 2 sums exp(x - m) in fp32 per
// block, the blocks in double. In the block of the max, the elements equal to m (x - m ==
// 0) are left out of the sum and counted instead: s' = sum + (count - 1), the count exact
// and added last, so the max's own 1 never enters an fp32 sum and a tiny s' keeps its
// digits. (A tie in another block adds its exact 1.) This needs m finite: a chunk whose max
// is +-inf takes the careful pass 2, which counts the elements equal to m everywhere
// (exp(m - m) is NaN for an infinite m).
//
// The passes run over full vectors, pass 2 kUnroll at a time: the exp is a chain of
// dependent operations (about 40 cycles), so independent vectors side by side are what
// keeps the vector units busy. A chunk's last partial vector is taken apart.

constexpr int64_t kUnroll = 4;

template <typename acc_t>
struct ChunkMax {
  acc_t m;  // the max of the elements that are not NaN (-inf if none)
  bool has_nan;
  int64_t block;  // the start of a block of kBlock vectors that holds m (if m > -inf)
};

// Pass 1, by blocks of kBlock vectors: each block's max per lane is folded into the running
// max per lane, which also records in which block it last rose.
template <typename T, typename acc_t>
ChunkMax<acc_t> chunk_max(const T* p, int64_t len) {
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const V neg_inf(-infinity<acc_t>()), zero(acc_t(0));
  // clamp_min is one instruction that keeps the non-NaN side; NaNs are caught by x != x.
  V run = neg_inf, run_block = zero, nan0 = zero, nan1 = zero;
  const int64_t full = len - len % kVec;
  for (int64_t b = 0; b < len; b += kBlock * kVec) {
    const int64_t end = std::min(full, b + kBlock * kVec);
    V m0 = neg_inf, m1 = neg_inf;
    int64_t j = b;
    for (; j + 2 * kVec <= end; j += 2 * kVec) {
      const V x0 = io::load(p + j), x1 = io::load(p + j + kVec);
      m0 = at::vec::clamp_min(m0, x0);
      m1 = at::vec::clamp_min(m1, x1);
      nan0 = nan0 | (x0 != x0);
      nan1 = nan1 | (x1 != x1);
    }
    if (j < end) {
      const V x0 = io::load(p + j);
      m0 = at::vec::clamp_min(m0, x0);
      nan0 = nan0 | (x0 != x0);
    }
    if (end == full && full < len) {  // the chunk's last partial vector
      const V x1 = V::set(neg_inf, io::load(p + full, len - full), len - full);
      m1 = at::vec::clamp_min(m1, x1);
      nan1 = nan1 | (x1 != x1);
    }
    const V block_max = at::vec::clamp_min(m0, m1);
    run_block = V::blendv(run_block, V(static_cast<acc_t>(b)), block_max > run);
    run = at::vec::clamp_min(run, block_max);
  }
  // A mask lane is 0 or all ones; all ones is not == 0.
  const bool has_nan = (nan0 | nan1).zero_mask() != (1 << kVec) - 1;
  const acc_t m = hmax(run);
  int64_t block = 0;
  if (len > kBlock * kVec) {
    alignas(64) acc_t runs[kVec], blocks[kVec];
    run.store(runs);
    run_block.store(blocks);
    for (int64_t i = 0; i < kVec; ++i) {
      if (runs[i] == m) {
        block = static_cast<int64_t>(blocks[i]);
        break;
      }
    }
  }
  return {m, has_nan, block};
}

// exp(x - m) of the full vector at element j of p, stored at e_out + j when kStore.
template <bool kStore, typename T, typename acc_t>
inline Vectorized<acc_t> exp_at(const T* p, int64_t j, Vectorized<acc_t> vm, acc_t* e_out) {
  const Vectorized<acc_t> e = exp_of(IO<T, acc_t>::load(p + j) - vm);
  if constexpr (kStore) e.store(e_out + j);
  return e;
}

// Per lane, the sum of exp(x - m) over the full vectors of [from, to), kUnroll at a time.
template <bool kStore, typename T, typename acc_t>
inline Vectorized<acc_t> exp_sum(const T* p, int64_t from, int64_t to, Vectorized<acc_t> vm,
                                 acc_t* e_out) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  static_assert(kUnroll == 4);
  V a(acc_t(0));
  int64_t j = from;
  for (; j + kUnroll * kVec <= to; j += kUnroll * kVec) {
    a += (exp_at<kStore>(p, j, vm, e_out) + exp_at<kStore>(p, j + kVec, vm, e_out)) +
         (exp_at<kStore>(p, j + 2 * kVec, vm, e_out) + exp_at<kStore>(p, j + 3 * kVec, vm, e_out));
  }
  for (; j < to; j += kVec) a += exp_at<kStore>(p, j, vm, e_out);
  return a;
}

// The same over the block of the max, with the elements equal to m counted apart: adds the
// sum of the others to `sum` and their count to `ties`, per lane.
template <bool kStore, typename T, typename acc_t>
inline void exp_sum_counting_max(const T* p, int64_t from, int64_t to, Vectorized<acc_t> vm,
                                 acc_t* e_out, Vectorized<acc_t>& sum, Vectorized<acc_t>& ties) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const V zero(acc_t(0)), one(acc_t(1));
  auto take = [&](int64_t j) {
    const V t = IO<T, acc_t>::load(p + j) - vm;
    const V e = exp_of(t);
    if constexpr (kStore) e.store(e_out + j);
    const V at_max = t == zero;
    sum += V::blendv(e, zero, at_max);
    ties += at_max & one;
  };
  int64_t j = from;
  for (; j + 2 * kVec <= to; j += 2 * kVec) {
    take(j);
    take(j + kVec);
  }
  if (j < to) take(j);
}

// s' of a chunk without NaN whose max m is finite, its block of the max from pass 1. With
// kStore, also stores exp(x - m) at e_out (the max's 1 included).
//
// While the exps run, it prefetches the chunk's length of bytes that follow it in memory
// (the row's next chunk, or the next row of a contiguous tensor), one cache line per
// kLineBytes bytes of the chunk: the next chunk's max pass then reads from cache, and memory
// traffic overlaps the arithmetic instead of alternating with it. A prefetch past the
// tensor's end is harmless (it never faults).

template <bool kStore, typename T, typename acc_t>
double chunk_rest(const T* p, int64_t len, acc_t m, int64_t max_block, acc_t* e_out) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const char* ahead = reinterpret_cast<const char*>(p + len);
  const V vm(m), zero(acc_t(0));
  const int64_t full = len - len % kVec;
  BlockTotal<acc_t> total;
  V ties = zero;
  for (int64_t b = 0; b < full; b += kBlock * kVec) {
    const int64_t end = std::min(full, b + kBlock * kVec);
    for (int64_t q = b * int64_t(sizeof(T)); q < end * int64_t(sizeof(T)); q += kLineBytes)
      __builtin_prefetch(ahead + q);
    if (b == max_block) {
      V sum = zero;
      exp_sum_counting_max<kStore>(p, b, end, vm, e_out, sum, ties);
      total.add(hsum(sum));
    } else {
      total.add(hsum(exp_sum<kStore>(p, b, end, vm, e_out)));
    }
  }
  if (full < len) {  // the last partial vector, in the last block
    const int64_t count = len - full;
    const V t = IO<T, acc_t>::load(p + full, count) - vm;
    V e = exp_of(t);
    if constexpr (kStore) e.store(e_out + full, count);
    e = V::set(zero, e, count);
    if (max_block + kBlock * kVec > full) {  // that block holds the max
      const V at_max = V::set(zero, t == zero, count);
      e = V::blendv(e, zero, at_max);
      ties += at_max & V(acc_t(1));
    }
    total.add(hsum(e));
  }
  // (ties - 1) is exact: added last, it keeps a tiny sum's precision.
  return total.value() + (hsum(ties) - 1.0);
}

// s' of a chunk whose max m is +-inf (and no NaN): elements equal to m are counted, not
// exponentiated.
template <typename T, typename acc_t>
double chunk_rest_careful(const T* p, int64_t len, acc_t m) {
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const V vm(m), zero(acc_t(0)), one(acc_t(1));
  BlockSum<acc_t> sum, ties;
  for (int64_t j = 0; j < len; j += kVec) {
    const int64_t count = std::min(kVec, len - j);
    const V v = io::load(p + j, count);
    const V eq = v == vm;
    V e = V::blendv(exp_of(v - vm), zero, eq);
    V t = eq & one;
    if (count < kVec) {
      e = V::set(zero, e, count);
      t = V::set(zero, t, count);
    }
    sum.add(e);
    ties.add(t);
  }
  // (ties - 1) first: it is exact, and adding it last keeps a tiny sum's precision.
  return sum.result() + (ties.result() - 1.0);
}

// (m, s') of a chunk; with e_out (for a finite max, no NaN), also exp(x - m) stored there.
template <typename T, typename acc_t>
State chunk_stats(const T* p, int64_t len, acc_t* e_out = nullptr) {
  const ChunkMax<acc_t> cm = chunk_max<T, acc_t>(p, len);
  const acc_t m = cm.m;
  if (cm.has_nan) return State{static_cast<double>(m), std::numeric_limits<double>::quiet_NaN()};
  if (!std::isfinite(m))
    return State{static_cast<double>(m), chunk_rest_careful<T, acc_t>(p, len, m)};
  const double rest = e_out != nullptr ? chunk_rest<true, T, acc_t>(p, len, m, cm.block, e_out)
                                       : chunk_rest<false, T, acc_t>(p, len, m, cm.block, e_out);
  return State{static_cast<double>(m), rest};
}

template <typename T, typename acc_t>
State segment_stats(const T* x, int64_t len) {
  if (len <= kChunk) return chunk_stats<T, acc_t>(x, len);
  State total = State::empty();
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    total = merge(total, chunk_stats<T, acc_t>(x + c0, std::min(kChunk, len - c0)));
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// The driver that spreads rows (inner == 1), or segments of rows, over threads.

// Whether rows are split into segments on different threads: when there are fewer rows than
// threads and the rows are long.
inline bool split_rows(int64_t rows, int64_t n) {
  return rows < at::get_num_threads() && n >= 2 * kSplitMin;
}

// For each of `rows` rows of n elements: total = combine over segments of reduce(r, b, e),
// then map(r, b, e, total) over the same segments. Rows are spread over threads, or split
// into segments (split_rows) that start on chunk boundaries, so that a segment's chunks
// are the row's chunks.
template <typename Partial, typename Reduce, typename Combine, typename Map>
void run_rows(int64_t rows, int64_t n, Reduce reduce, Combine combine, Map map) {
  if (!split_rows(rows, n)) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) map(r, 0, n, reduce(r, 0, n));
    });
    return;
  }
  const int64_t wanted = std::min(ceil_div(int64_t(at::get_num_threads()), rows), n / kSplitMin);
  const int64_t seg_len = ceil_div(ceil_div(n, wanted), kChunk) * kChunk;
  const int64_t segments = ceil_div(n, seg_len);
  std::vector<Partial> parts(rows * segments);
  at::parallel_for(0, rows * segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / segments, b = (i % segments) * seg_len;
      parts[i] = reduce(r, b, std::min(n, b + seg_len));
    }
  });
  std::vector<Partial> totals(rows);
  for (int64_t r = 0; r < rows; ++r) {
    Partial t = parts[r * segments];
    for (int64_t k = 1; k < segments; ++k) t = combine(t, parts[r * segments + k]);
    totals[r] = t;
  }
  at::parallel_for(0, rows * segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / segments, b = (i % segments) * seg_len;
      map(r, b, std::min(n, b + seg_len), totals[r]);
    }
  });
}

State merge_states(State a, State b) { return merge(a, b); }
double add_doubles(double a, double b) { return a + b; }

// ---------------------------------------------------------------------------------------
// Strided kernels (inner > 1): reducing a dim that is not the last. A task takes `width`
// neighbouring rows (o, i0 ... i0 + width - 1) and streams through the n steps j, each a
// contiguous run of `width` elements in memory, keeping one state per row in small arrays
// (L1): no transpose, and every load is contiguous. The width keeps a task's n x width tile
// within L2, so the second pass over it reads from cache.

constexpr int64_t kMaxWidth = 1024;

template <typename F>
void run_columns(const Layout& L, int64_t element_bytes, F f) {
  const int64_t fit = (int64_t(512) << 10) / std::max<int64_t>(1, L.n * element_bytes);
  const int64_t width = std::min({kMaxWidth, std::max<int64_t>(64, fit / 64 * 64), L.inner});
  const int64_t blocks = ceil_div(L.inner, width);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (L.n * width));
  at::parallel_for(0, L.outer * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / blocks, i0 = (t % blocks) * width;
      f(o, i0, std::min(width, L.inner - i0));
    }
  });
}

// Per-row (m, s') of `width` rows whose element j is at x[j * stride + i]: the max per row
// (NaN-propagating), then the sum of exp(x - m) over the elements != m plus the ties minus
// one, in fp32 blocks of kBlock steps added into doubles.
template <typename T, typename acc_t>
void column_stats(const T* x, int64_t n, int64_t stride, int64_t width, acc_t* m, double* s) {
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const V zero(acc_t(0)), one(acc_t(1));
  for (int64_t i = 0; i < width; ++i) m[i] = -infinity<acc_t>();
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < width; i += kVec) {
      const int64_t c = std::min(kVec, width - i);
      at::vec::maximum(V::loadu(m + i, c), io::load(x + j * stride + i, c)).store(m + i, c);
    }
  }
  alignas(64) acc_t block[kMaxWidth], ties[kMaxWidth];
  double tie_count[kMaxWidth];
  std::fill(s, s + width, 0.0);
  std::fill(tie_count, tie_count + width, 0.0);
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    std::fill(block, block + width, acc_t(0));
    std::fill(ties, ties + width, acc_t(0));
    for (int64_t j = j0; j < std::min(n, j0 + kBlock); ++j) {
      for (int64_t i = 0; i < width; i += kVec) {
        const int64_t c = std::min(kVec, width - i);
        const V v = io::load(x + j * stride + i, c), vm = V::loadu(m + i, c);
        const V eq = v == vm;  // exp(m - m) is NaN for infinite m: count ties apart
        (V::loadu(block + i, c) + V::blendv(exp_nan_safe(v - vm), zero, eq)).store(block + i, c);
        (V::loadu(ties + i, c) + (eq & one)).store(ties + i, c);
      }
    }
    for (int64_t i = 0; i < width; ++i) {
      s[i] += block[i];
      tie_count[i] += ties[i];
    }
  }
  // (ties - 1) is exact: added last, it keeps a tiny sum's precision (one max left out).
  for (int64_t i = 0; i < width; ++i) s[i] += tie_count[i] - 1.0;
}

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
