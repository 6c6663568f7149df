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

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ceil_div.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <stablekernels/cross_entropy_rows.h>
#include <stablekernels/online_softmax.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#ifndef SK_CAPABILITY_NAMESPACE
#error "define SK_CAPABILITY_NAMESPACE before including kernels_impl.h"
#endif

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

using at::vec::Vectorized;
using c10::BFloat16;
using c10::Half;

constexpr int64_t kChunk = 16384;          // elements per chunk of the row statistics
constexpr int64_t kBlock = 16;             // vectors summed in fp32 before joining the double
constexpr int64_t kGrainElements = 32768;  // at least this many elements per parallel task
constexpr int64_t kSplitMin = 65536;       // shortest segment of a row split across threads

using at::ceil_div;
using State = RowState<double>;
constexpr int64_t kLineBytes = 64;  // a cache line

template <typename acc_t>
acc_t infinity() {
  return std::numeric_limits<acc_t>::infinity();
}

// ---------------------------------------------------------------------------------------
// Streaming stores: an output larger than the last-level cache cannot stay there, and a
// plain store first reads each of its cache lines from memory (to own it) before writing it
// back: a third stream of memory traffic beside the input's read and the output's write.
// A non-temporal store writes whole lines without reading them. It needs an address
// aligned to its width and a fence before other threads read the data (store_each
// provides both). The DEFAULT build has none and stores plainly.

#if defined(CPU_CAPABILITY_AVX512)
inline void stream_raw(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream_raw(double* p, __m512d v) { _mm512_stream_pd(p, v); }
inline void stream_raw(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
using RawInt = __m512i;
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream_raw(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void stream_raw(double* p, __m256d v) { _mm256_stream_pd(p, v); }
inline void stream_raw(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
using RawInt = __m256i;
#endif

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// The bytes from which a call's output is streamed: STABLEKERNELS_STREAMING_MIN_BYTES if
// set (read at each call; 0 streams every output, as the tests do), else half the
// last-level cache of this machine (from sysfs; 32 MiB where it does not say).
int64_t streaming_threshold_bytes() {
  if (const char* forced = std::getenv("STABLEKERNELS_STREAMING_MIN_BYTES")) {
    return std::strtoll(forced, nullptr, 10);
  }
  static const int64_t half_cache_bytes = [] {
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string path =
          "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
      std::FILE* f = std::fopen(path.c_str(), "r");
      if (f == nullptr) continue;
      long long size = 0;
      char unit = 0;
      if (std::fscanf(f, "%lld%c", &size, &unit) >= 1) {
        const int64_t scale = unit == 'K'   ? int64_t(1) << 10
                              : unit == 'M' ? int64_t(1) << 20
                              : unit == 'G' ? int64_t(1) << 30
                                            : 1;
        largest = std::max<int64_t>(largest, size * scale);
      }
      std::fclose(f);
    }
    return (largest > 0 ? largest : int64_t(32) << 20) / 2;
  }();
  return half_cache_bytes;
}

// How a kernel writes its output: plain stores, or streamed past the caches.
enum class Store { cached, streamed };

// Streamed when the call's output is at least half the last-level cache: written after
// inputs at least as large, most of it would be evicted before anything reads it (glibc's
// memcpy streams from three quarters of a thread's share of that cache on).
inline Store store_for(int64_t output_bytes) {
  return output_bytes >= streaming_threshold_bytes() ? Store::streamed : Store::cached;
}

// ---------------------------------------------------------------------------------------
// Loads and stores of Vectorized<acc_t>::size() elements of T, as acc_t. Lanes past
// `count` load as 0. stream2 stores two full vectors with non-temporal stores, at an
// address aligned to a cache line (plain stores where there are none).

template <typename T, typename acc_t>
struct IO {  // mixed precision with fp64 (rare): through a buffer
  using V = Vectorized<acc_t>;
  static constexpr int64_t kVec = V::size();
  static V load(const T* p, int64_t count = kVec) {
    alignas(64) acc_t buf[kVec];
    for (int64_t i = 0; i < kVec; ++i) buf[i] = i < count ? static_cast<acc_t>(p[i]) : acc_t(0);
    return V::loadu(buf);
  }
  static void store(T* p, V v, int64_t count = kVec) {
    alignas(64) acc_t buf[kVec];
    v.store(buf);
    for (int64_t i = 0; i < count; ++i) p[i] = static_cast<T>(buf[i]);
  }
  static void store2(T* p, V a, V b) {
    store(p, a);
    store(p + kVec, b);
  }
  static void stream2(T* p, V a, V b) { store2(p, a, b); }
};

template <typename T>
struct IO<T, T> {  // fp32 as fp32, fp64 as fp64
  using V = Vectorized<T>;
  static constexpr int64_t kVec = V::size();
  static V load(const T* p, int64_t count = kVec) {
    return count == kVec ? V::loadu(p) : V::loadu(p, count);
  }
  static void store(T* p, V v, int64_t count = kVec) { v.store(p, count); }
  static void store2(T* p, V a, V b) {
    a.store(p);
    b.store(p + kVec);
  }
  static void stream2(T* p, V a, V b) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    stream_raw(p, a);  // Vectorized<T> is its intrinsic vector type
    stream_raw(p + kVec, b);
#else
    store2(p, a, b);
#endif
  }
};

template <typename H>
struct ReducedIO {  // bf16 and fp16 as fp32
  using V = Vectorized<float>;
  static constexpr int64_t kVec = V::size();
  static V load(const H* p, int64_t count = kVec) {
    if (count == kVec) {
      V out;
      at::vec::load_to_float(p, out);
      return out;
    }
    return std::get<0>(at::vec::convert_to_float<H>(Vectorized<H>::loadu(p, count)));
  }
  static void store(H* p, V v, int64_t count = kVec) {
    // Rounds once, to nearest even. Vectorized<H>::store of fewer lanes than its own size
    // (2 kVec) goes through a buffer and a variable-length copy: a full vector's kVec halves
    // are the low half of the converted pair, copied with a fixed size (one vector store).
    const Vectorized<H> h = at::vec::convert_from_float<H>(v, v);
    if (count == kVec) {
      std::memcpy(p, &h, kVec * sizeof(H));
    } else {
      h.store(p, count);
    }
  }
  static void store2(H* p, V a, V b) { at::vec::convert_from_float<H>(a, b).store(p); }
  static void stream2(H* p, V a, V b) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    stream_raw(static_cast<void*>(p), static_cast<RawInt>(at::vec::convert_from_float<H>(a, b)));
#else
    store2(p, a, b);
#endif
  }
};
template <>
struct IO<BFloat16, float> : ReducedIO<BFloat16> {};
template <>
struct IO<Half, float> : ReducedIO<Half> {};

// exp of fp32 lanes t <= 88 (NaN and -inf give 0): t = n ln2 + r with n = round(t / ln2)
// (taken from the low bits of t log2(e) + 1.5 * 2^23) and ln2 split in two (Cody-Waite), so
// r in [-ln2/2, ln2/2] is exact to a few ulp of r at any n; e^r by a degree-5 polynomial
// (minimax for relative error, 1 exactly at r = 0, so exp(0) == 1); 2^n added to its
// exponent bits. Results below 2^-125 (t < -86.98) flush to 0, torch's exp_u20 flushing
// below 2^-126. 13 vector operations, 8 of them fused multiply-adds, no division, no call.
// Error: at most 2.5 ulp over every float t in [-104, 0] where exp(t) >= 2^-125 (1.98 with
// fused multiply-adds, 2.28 without: measured against double exp over all of them by
// csrc/tests/test_cpu_kernels.cpp, which fails above 2.5; docs/numerics.md).
constexpr float kExpFlushBelow = -86.98f;  // n = round(t log2 e) >= -125: 2^n p stays normal
inline Vectorized<float> exp_fp32(Vectorized<float> t) {
  using V = Vectorized<float>;
  using I = Vectorized<int32_t>;
  const V shifter(0x1.8p23f);
  const V k = at::vec::fmadd(t, V(0x1.715476p+0f), shifter);  // log2(e); n in k's low bits
  const V n = k - shifter;
  V r = at::vec::fmadd(n, V(-0x1.62e4p-1f), t);   // ln2's high part: n * it is exact
  r = at::vec::fmadd(n, V(-0x1.7f7d1cp-20f), r);  // ln2's low part
  V p = at::vec::fmadd(V(0x1.0fa7e6p-7f), r, V(0x1.573a98p-5f));
  p = at::vec::fmadd(p, r, V(0x1.555a6cp-3f));
  p = at::vec::fmadd(p, r, V(0x1.fffdc4p-2f));
  p = at::vec::fmadd(p, r, V(0x1.fffff6p-1f));
  p = at::vec::fmadd(p, r, V(1.0f));
  const I two_to_n = at::vec::cast<int32_t>(k) << I(23);  // k's bits: 0x4b400000 + n
  const V e = at::vec::cast<float>(at::vec::cast<int32_t>(p) + two_to_n);
  return e & (t >= V(kExpFlushBelow));
}

// exp of a vector whose lanes are never NaN: exp_fp32 for fp32 (it maps NaN to 0, hence
// exp_nan_safe where a NaN can arrive); Sleef's exp for fp64 (1 ulp, NaN-propagating).
template <typename acc_t>
Vectorized<acc_t> exp_of(Vectorized<acc_t> t) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_fp32(t);
  } else {
    return t.exp();
  }
}

template <typename acc_t>
Vectorized<acc_t> exp_nan_safe(Vectorized<acc_t> t) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return Vectorized<acc_t>::blendv(exp_fp32(t), t, t != t);
  } else {
    return t.exp();
  }
}

// Horizontal max (NaN-propagating) and sum (in double) of a vector: shuffle trees, not
// dependent chains of lane operations.
template <typename acc_t>
acc_t hmax(Vectorized<acc_t> v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t> a, Vectorized<acc_t> b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
double hsum(Vectorized<acc_t> v) {
  // A shuffle tree (log2 of the lanes deep), not a dependent chain of lane adds.
  return static_cast<double>(at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t> a, Vectorized<acc_t> b) { return a + b; }, v));
}

// a / b, as the correctly rounded quotient in all but rare cases (at most 1 ulp off), from
// r = 1/b: q = a * r, then one refinement q + (a - q * b) * r with fused multiply-adds (the
// remainder a - q * b is exact). Vector division costs 5 or more cycles per vector where
// these cost 1 or 2. neg_b is -b.
template <typename acc_t>
Vectorized<acc_t> divide(Vectorized<acc_t> a, Vectorized<acc_t> r, Vectorized<acc_t> neg_b) {
  const Vectorized<acc_t> q = a * r;
  return at::vec::fmadd(at::vec::fmadd(q, neg_b, a), r, q);
}

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
// Row kernels (inner == 1) and the driver that spreads rows, or segments of rows, over
// threads.

// Stores value(j, count), a vector of acc_t for the `count` elements from j on, at out + j
// for each vector of [0, len): full vectors two at a time (so that halves are converted
// two vectors in one go), then the last partial one. Streamed: plain stores up to the first
// cache-line boundary, streaming stores of whole lines from there, then a fence.
template <typename acc_t, typename U, typename F>
inline void store_each(U* out, int64_t len, F value, Store mode = Store::cached) {
  using io = IO<U, acc_t>;
  constexpr int64_t kVec = Vectorized<acc_t>::size();
  int64_t j = 0;
  if (mode == Store::streamed) {
    const auto address = reinterpret_cast<std::uintptr_t>(out);
    const int64_t head =
        address % sizeof(U) != 0
            ? len
            : std::min<int64_t>(len,
                                ((kLineBytes - address % kLineBytes) % kLineBytes) / sizeof(U));
    for (; j < head; j += kVec) {
      const int64_t count = std::min(kVec, head - j);
      io::store(out + j, value(j, count), count);
    }
    j = head;
    for (; j + 2 * kVec <= len; j += 2 * kVec)
      io::stream2(out + j, value(j, kVec), value(j + kVec, kVec));
    stream_fence();
  } else {
    for (; j + 2 * kVec <= len; j += 2 * kVec)
      io::store2(out + j, value(j, kVec), value(j + kVec, kVec));
  }
  for (; j < len; j += kVec) {
    const int64_t count = std::min(kVec, len - j);
    io::store(out + j, value(j, count), count);
  }
}

// Stores `value` over out[0, len).
template <typename acc_t, typename U>
void fill_row(U* out, int64_t len, acc_t value, Store mode = Store::cached) {
  const Vectorized<acc_t> v(value);
  store_each<acc_t>(out, len, [v](int64_t, int64_t) { return v; }, mode);
}

template <typename acc_t, typename U>
void store_nan(U* out, int64_t len, Store mode = Store::cached) {
  fill_row<acc_t>(out, len, std::numeric_limits<acc_t>::quiet_NaN(), mode);
}

// softmax or log_softmax of a segment of a row from the row's state, exp computed here.
template <typename T, typename U>
void softmax_write(const T* x, U* y, int64_t len, State st, bool log, Store mode = Store::cached) {
  using acc_t = acc_of<T, U>;
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  if (row_is_nan(st)) {
    // torch: a row with a +inf (inf - inf), a NaN, or nothing but -inf is NaN throughout.
    store_nan<acc_t>(y, len, mode);
    return;
  }
  const V vm(static_cast<acc_t>(st.m));
  if (log) {
    const V log_sum(static_cast<acc_t>(std::log1p(st.s)));
    store_each<acc_t>(
        y, len, [=](int64_t j, int64_t count) { return (io::load(x + j, count) - vm) - log_sum; },
        mode);
  } else {
    const acc_t denominator = static_cast<acc_t>(1.0 + st.s);
    const V r(acc_t(1) / denominator), neg_den(-denominator);
    store_each<acc_t>(
        y, len,
        [=](int64_t j, int64_t count) {
          return divide(exp_of(io::load(x + j, count) - vm), r, neg_den);
        },
        mode);
  }
}

// y = e / ((1 + s') exp(m - m_c)) over a chunk whose exps e = exp(x - m_c) were stored by its
// statistics pass (m_c: the chunk's max; (m, s'): the row's state): the row's denominator
// seen from the chunk, in double, rounded once. A chunk of -inf only (no exps stored) is 0;
// a NaN row is NaN. e and y may be the same memory.
template <typename acc_t, typename U>
void write_scaled_chunk(const acc_t* e, U* y, int64_t len, State st, acc_t m_c,
                        Store mode = Store::cached) {
  using V = Vectorized<acc_t>;
  if (row_is_nan(st)) {
    store_nan<acc_t>(y, len, mode);
    return;
  }
  if (m_c == -infinity<acc_t>()) {
    fill_row<acc_t>(y, len, acc_t(0), mode);
    return;
  }
  const double gap = st.m - static_cast<double>(m_c);
  const acc_t denominator = static_cast<acc_t>((1.0 + st.s) * (gap == 0 ? 1.0 : std::exp(gap)));
  const V r(acc_t(1) / denominator), neg_den(-denominator);
  store_each<acc_t>(
      y, len, [=](int64_t j, int64_t count) { return divide(V::loadu(e + j, count), r, neg_den); },
      mode);
}

// Rows up to this many elements keep their exps for the write pass (in a per-thread buffer,
// 4 MiB of fp32 at most, when y is not of the accumulation dtype or is streamed); longer
// ones compute them again (or keep them in y itself).
constexpr int64_t kKeepExpsMax = int64_t(1) << 20;

// softmax or log_softmax of a whole row, on one thread. softmax keeps the exps of the
// statistics pass with each chunk's max, then scales them: one exp per element, x read
// once. The exps go to y itself when y has the accumulation dtype and is cached, else to a
// per-thread buffer (a streamed y is written once, by the scaling pass).
template <typename T, typename U>
State softmax_row(const T* x, U* y, int64_t n, bool log, Store mode) {
  using acc_t = acc_of<T, U>;
  constexpr bool kSameType = std::is_same_v<U, acc_t>;
  if (log || (!kSameType && n > kKeepExpsMax)) {
    const State st = segment_stats<T, acc_t>(x, n);
    softmax_write(x, y, n, st, log, mode);
    return st;
  }
  acc_t* e;
  if (kSameType && (mode == Store::cached || n > kKeepExpsMax)) {
    e = reinterpret_cast<acc_t*>(y);
    mode = Store::cached;
  } else {
    thread_local std::vector<acc_t> buffer;
    if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    e = buffer.data();
  }
  if (n <= kChunk) {
    const State st = chunk_stats<T, acc_t>(x, n, e);
    write_scaled_chunk(e, y, n, st, static_cast<acc_t>(st.m), mode);
    return st;
  }
  thread_local std::vector<acc_t> maxima;
  maxima.resize(ceil_div(n, kChunk));
  State st = State::empty();
  for (int64_t c0 = 0, k = 0; c0 < n; c0 += kChunk, ++k) {
    const State c = chunk_stats<T, acc_t>(x + c0, std::min(kChunk, n - c0), e + c0);
    maxima[k] = static_cast<acc_t>(c.m);
    st = merge(st, c);
  }
  for (int64_t c0 = 0, k = 0; c0 < n; c0 += kChunk, ++k)
    write_scaled_chunk(e + c0, y + c0, std::min(kChunk, n - c0), st, maxima[k], mode);
  return st;
}

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

// softmax of rows split into segments (split_rows), into y of the accumulation dtype: the
// statistics pass stores exp(x - m_c) into y and records each chunk's max m_c; the write
// pass scales each chunk (write_scaled_chunk). One exp per element, and x is read once.
template <typename T, typename acc_t>
void softmax_split_rows(const T* x, acc_t* y, const Layout& L) {
  const int64_t chunks = ceil_div(L.n, kChunk);
  std::vector<acc_t> chunk_maxima(L.outer * chunks);
  run_rows<State>(
      L.outer, L.n,
      [&](int64_t r, int64_t b, int64_t e) {
        State total = State::empty();
        for (int64_t c0 = b; c0 < e; c0 += kChunk) {
          const State st = chunk_stats<T, acc_t>(x + r * L.x_stride + c0, std::min(kChunk, e - c0),
                                                 y + r * L.n + c0);
          chunk_maxima[r * chunks + c0 / kChunk] = static_cast<acc_t>(st.m);
          total = merge(total, st);
        }
        return total;
      },
      merge_states,
      [&](int64_t r, int64_t b, int64_t e, State st) {
        acc_t* row = y + r * L.n;
        for (int64_t c0 = b; c0 < e; c0 += kChunk) {
          write_scaled_chunk(row + c0, row + c0, std::min(kChunk, e - c0), st,
                             chunk_maxima[r * chunks + c0 / kChunk]);
        }
      });
}

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

// softmax / log_softmax of `width` strided rows, given their statistics.
template <typename T, typename U, typename acc_t>
void column_softmax_write(const T* x, U* y, int64_t n, int64_t stride, int64_t width,
                          const acc_t* m, const double* s, bool log) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  // c: the denominator 1 + s', or log1p(s'). poison: 0, or NaN for rows with a +inf, a NaN
  // or nothing but -inf (torch makes those NaN throughout); added to every result.
  alignas(64) acc_t c[kMaxWidth], rcp[kMaxWidth], neg_c[kMaxWidth], poison[kMaxWidth];
  for (int64_t i = 0; i < width; ++i) {
    c[i] = static_cast<acc_t>(log ? std::log1p(s[i]) : 1.0 + s[i]);
    rcp[i] = acc_t(1) / c[i];
    neg_c[i] = -c[i];
    poison[i] = std::isfinite(m[i]) ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* xj = x + j * stride;
    store_each<acc_t>(y + j * stride, width, [&](int64_t i, int64_t k) {
      const V t = IO<T, acc_t>::load(xj + i, k) - V::loadu(m + i, k);
      const V r = log ? t - V::loadu(c + i, k)
                      : divide(exp_of(t), V::loadu(rcp + i, k), V::loadu(neg_c + i, k));
      return r + V::loadu(poison + i, k);
    });
  }
}

// ---------------------------------------------------------------------------------------
// The four kernels, for one pair of dtypes.

template <typename T, typename U>
void softmax_forward_typed(const T* x, U* y, Layout L, bool log) {
  using acc_t = acc_of<T, U>;
  const Store mode = store_for(L.outer * L.block() * int64_t(sizeof(U)));
  if (L.inner == 1 && !split_rows(L.outer, L.n)) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / L.n);
    at::parallel_for(0, L.outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        softmax_row(x + r * L.x_stride, y + r * L.n, L.n, log, mode);
    });
    return;
  }
  if constexpr (std::is_same_v<U, acc_t>) {
    if (L.inner == 1 && !log) {
      softmax_split_rows(x, y, L);
      return;
    }
  }
  if (L.inner == 1) {  // log_softmax, or an output in another dtype: exp again on writing
    run_rows<State>(
        L.outer, L.n,
        [&](int64_t r, int64_t b, int64_t e) {
          return segment_stats<T, acc_t>(x + r * L.x_stride + b, e - b);
        },
        merge_states,
        [&](int64_t r, int64_t b, int64_t e, State st) {
          softmax_write(x + r * L.x_stride + b, y + r * L.n + b, e - b, st, log, mode);
        });
    return;
  }
  run_columns(L, sizeof(T), [&](int64_t o, int64_t i0, int64_t width) {
    const T* xb = x + o * L.x_stride + i0;
    alignas(64) acc_t m[kMaxWidth];
    double s[kMaxWidth];
    column_stats<T, acc_t>(xb, L.n, L.inner, width, m, s);
    column_softmax_write(xb, y + o * L.block() + i0, L.n, L.inner, width, m, s, log);
  });
}

template <typename T>
void logsumexp_forward_typed(const T* x, T* out, double* lse, Layout L) {
  using acc_t = acc_of<T>;
  auto store = [&](int64_t row, State st) {
    const double value = finish_lse(st);
    lse[row] = value;
    out[row] = static_cast<T>(static_cast<acc_t>(value));  // halves: round once, from fp32
  };
  if (L.inner == 1) {
    run_rows<State>(
        L.outer, L.n,
        [&](int64_t r, int64_t b, int64_t e) {
          return segment_stats<T, acc_t>(x + r * L.x_stride + b, e - b);
        },
        merge_states,
        [&](int64_t r, int64_t b, int64_t, State st) {
          if (b == 0) store(r, st);
        });
    return;
  }
  run_columns(L, sizeof(T), [&](int64_t o, int64_t i0, int64_t width) {
    alignas(64) acc_t m[kMaxWidth];
    double s[kMaxWidth];
    column_stats<T, acc_t>(x + o * L.x_stride + i0, L.n, L.inner, width, m, s);
    for (int64_t i = 0; i < width; ++i) store(o * L.inner + i0 + i, State{m[i], s[i]});
  });
}

// The backward of softmax (kLog false) and log_softmax (kLog true), per row:
//   softmax:     dot = sum(grad * y),  dx = y * (grad - dot)
//   log_softmax: dot = sum(grad),      dx = grad - exp(y) * dot
// On a contiguous segment: full vectors, then one partial vector (its lanes past the end
// load as 0, so they add nothing to dot). dot is summed in fp32 blocks of kBlock vectors, in
// four independent chains, added into a double (compensated for double inputs: BlockTotal).
template <bool kLog, typename T, typename acc_t>
struct BackwardRow {
  using V = Vectorized<acc_t>;
  using io = IO<T, acc_t>;
  static constexpr int64_t kVec = V::size();

  static V term(V g, V y) {
    if constexpr (kLog) {
      return g;
    } else {
      return g * y;
    }
  }
  static V result(V g, V y, V dot) {
    if constexpr (kLog) {
      return at::vec::fnmadd(exp_nan_safe(y), dot, g);  // one rounding, as written
    } else {
      return y * (g - dot);
    }
  }
  static V term_at(const T* g, const T* y, int64_t j) {
    return term(io::load(g + j), io::load(y + j));
  }

  static double dot(const T* g, const T* y, int64_t len) {
    const int64_t full = len - len % kVec;
    BlockTotal<acc_t> total;
    for (int64_t b = 0; b < full; b += kBlock * kVec) {
      const int64_t end = std::min(full, b + kBlock * kVec);
      V a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
      int64_t j = b;
      for (; j + 4 * kVec <= end; j += 4 * kVec) {
        a0 += term_at(g, y, j);
        a1 += term_at(g, y, j + kVec);
        a2 += term_at(g, y, j + 2 * kVec);
        a3 += term_at(g, y, j + 3 * kVec);
      }
      for (; j < end; j += kVec) a0 += term_at(g, y, j);
      total.add(hsum((a0 + a1) + (a2 + a3)));
    }
    if (full < len) {
      total.add(hsum(term(io::load(g + full, len - full), io::load(y + full, len - full))));
    }
    return total.value();
  }

  template <typename U>
  static void write(const T* g, const T* y, U* dx, int64_t len, acc_t dot, Store mode) {
    const V vd(dot);
    store_each<acc_t>(
        dx, len,
        [=](int64_t j, int64_t count) {
          return result(io::load(g + j, count), io::load(y + j, count), vd);
        },
        mode);
  }
};

// grad, y and dx are contiguous here (L.x_stride == L.block()).
template <bool kLog, typename T, typename U>
void softmax_backward_impl(const T* grad, const T* y, U* dx, const Layout& L) {
  using acc_t = acc_of<T, U>;
  using io = IO<T, acc_t>;
  using row = BackwardRow<kLog, T, acc_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const int64_t n = L.n;
  if (L.inner == 1) {
    run_rows<double>(
        L.outer, n,
        [grad, y, n](int64_t r, int64_t b, int64_t e) {
          return row::dot(grad + r * n + b, y + r * n + b, e - b);
        },
        add_doubles,
        [grad, y, dx, n, mode = store_for(L.outer * n * int64_t(sizeof(U)))](
            int64_t r, int64_t b, int64_t e, double dot) {
          row::write(grad + r * n + b, y + r * n + b, dx + r * n + b, e - b,
                     static_cast<acc_t>(dot), mode);
        });
    return;
  }
  run_columns(L, 2 * sizeof(T), [&](int64_t o, int64_t i0, int64_t width) {
    const int64_t base = o * L.block() + i0;
    alignas(64) acc_t block[kMaxWidth], totals[kMaxWidth];
    double sums[kMaxWidth] = {};
    for (int64_t j0 = 0; j0 < L.n; j0 += kBlock) {
      std::fill(block, block + width, acc_t(0));
      for (int64_t j = j0; j < std::min(L.n, j0 + kBlock); ++j) {
        const int64_t at = base + j * L.inner;
        for (int64_t i = 0; i < width; i += kVec) {
          const int64_t c = std::min(kVec, width - i);
          (V::loadu(block + i, c) + row::term(io::load(grad + at + i, c), io::load(y + at + i, c)))
              .store(block + i, c);
        }
      }
      for (int64_t i = 0; i < width; ++i) sums[i] += block[i];
    }
    for (int64_t i = 0; i < width; ++i) totals[i] = static_cast<acc_t>(sums[i]);
    for (int64_t j = 0; j < L.n; ++j) {
      const int64_t at = base + j * L.inner;
      for (int64_t i = 0; i < width; i += kVec) {
        const int64_t c = std::min(kVec, width - i);
        IO<U, acc_t>::store(dx + at + i,
                            row::result(io::load(grad + at + i, c), io::load(y + at + i, c),
                                        V::loadu(totals + i, c)),
                            c);
      }
    }
  });
}

template <typename T, typename U>
void softmax_backward_typed(const T* grad, const T* y, U* dx, Layout L, bool log) {
  if (log) {
    softmax_backward_impl<true>(grad, y, dx, L);
  } else {
    softmax_backward_impl<false>(grad, y, dx, L);
  }
}

// dx = grad[r] * exp((x - hi[r]) - lo[r]): a pure map, split evenly over threads.
// dx = g[r] * exp((x - hi[r]) - lo[r]) with hi + lo = lse[r] (split_lse), g[r] the row's
// gradient (read as x's dtype at grad + r * grad_stride: 0 for one value for every row).
template <typename T>
void logsumexp_backward_typed(const T* grad, int64_t grad_stride, const double* lse, const T* x,
                              T* dx, Layout L) {
  using acc_t = acc_of<T>;
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  auto row_grad = [=](int64_t r) { return static_cast<acc_t>(grad[r * grad_stride]); };
  if (L.inner == 1) {
    const int64_t pieces = std::max<int64_t>(1, ceil_div(L.n, kSplitMin));
    const int64_t piece = ceil_div(L.n, pieces);
    const int64_t grain = std::max<int64_t>(1, kGrainElements / piece);
    const Store mode = store_for(L.outer * L.n * int64_t(sizeof(T)));
    at::parallel_for(0, L.outer * pieces, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / pieces, b = (t % pieces) * piece, e = std::min(L.n, b + piece);
        const LseSplit<acc_t> split = split_lse<acc_t>(lse[r]);
        const V g(row_grad(r)), vhi(split.hi), vlo(split.lo);
        const T* xr = x + r * L.x_stride + b;
        store_each<acc_t>(
            dx + r * L.n + b, e - b,
            [=](int64_t j, int64_t count) {
              return g * exp_nan_safe((io::load(xr + j, count) - vhi) - vlo);
            },
            mode);
      }
    });
    return;
  }
  run_columns(L, sizeof(T), [&](int64_t o, int64_t i0, int64_t width) {
    const int64_t row0 = o * L.inner + i0;
    const T* xb = x + o * L.x_stride + i0;
    T* db = dx + o * L.block() + i0;
    // The block's per-row values side by side, as the vector loads below read them.
    thread_local std::vector<acc_t> rows_g, rows_hi, rows_lo;
    rows_g.resize(width);
    rows_hi.resize(width);
    rows_lo.resize(width);
    for (int64_t i = 0; i < width; ++i) {
      const LseSplit<acc_t> split = split_lse<acc_t>(lse[row0 + i]);
      rows_g[i] = row_grad(row0 + i);
      rows_hi[i] = split.hi;
      rows_lo[i] = split.lo;
    }
    const acc_t *g = rows_g.data(), *h = rows_hi.data(), *l = rows_lo.data();
    for (int64_t j = 0; j < L.n; ++j) {
      const T* xj = xb + j * L.inner;
      store_each<acc_t>(db + j * L.inner, width, [=](int64_t i, int64_t c) {
        const V t = (io::load(xj + i, c) - V::loadu(h + i, c)) - V::loadu(l + i, c);
        return V::loadu(g + i, c) * exp_nan_safe(t);
      });
    }
  });
}

// ---------------------------------------------------------------------------------------
// Cross-entropy statistics of contiguous rows (row r at x + r * x_stride, C classes), class
// targets: per row nll = (m - x_t) + log1p(s'), and for label smoothing
// sum_c w_c (m - x_c) + W log1p(s') (w: class weights, all 1 without; W their sum), whose
// terms are all >= 0. sum_c w_c (m - x_c) is summed per chunk against the chunk's max and
// moved to the row's max as a_c + (m - m_c) W_c: no cancellation. The caller combines them
// into the loss.

// sum over a chunk of w_c (m - x_c), and of w_c (the count without weights).
template <typename T, typename acc_t>
std::pair<double, double> chunk_gaps(const T* p, int64_t len, acc_t m, const acc_t* w) {
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kVec = V::size();
  const V vm(m);
  BlockSum<acc_t> gaps, weights;
  for (int64_t j = 0; j < len; j += kVec) {
    const int64_t count = std::min(kVec, len - j);
    // A -inf logit's gap is +inf, as torch's smooth term, also in a chunk whose max is -inf
    // (where m - x would be -inf - -inf = NaN).
    const V x = io::load(p + j, count);
    const V d = V::blendv(vm - x, V(infinity<acc_t>()), x == V(-infinity<acc_t>()));
    if (w != nullptr) {
      const V wv = V::loadu(w + j, count);  // lanes past count load 0
      gaps.add(V::set(V(acc_t(0)), d * wv, count));
      weights.add(wv);
    } else {
      gaps.add(V::set(V(acc_t(0)), d, count));
    }
  }
  return {gaps.result(), w != nullptr ? weights.result() : static_cast<double>(len)};
}

// A class target in [0, classes), or IndexError in torch's words (the router checks first;
// this keeps a direct call of the kernel op from reading or writing outside a row).
inline void check_target(int64_t t, int64_t classes) {
  TORCH_CHECK_INDEX(t >= 0 && t < classes, "Target ", t, " is out of bounds.");
}

// The pieces of rows [0, rows), each handed to emit(r, nll, smooth, lse) (fp64; smooth 0
// without `smoothing`), rows in parallel. class_of(r) is the class whose logit row r reads,
// in [0, classes) (the callers check it).
template <typename T, typename ClassOf, typename Emit>
void cross_entropy_rows(const T* x, int64_t x_stride, ClassOf class_of, const acc_of<T>* weight,
                        int64_t rows, int64_t classes, bool smoothing, Emit emit) {
  using acc_t = acc_of<T>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / classes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> chunk_m, chunk_a, chunk_w;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      State st = State::empty();
      chunk_m.clear();
      chunk_a.clear();
      chunk_w.clear();
      for (int64_t c0 = 0; c0 < classes; c0 += kChunk) {
        const int64_t len = std::min(kChunk, classes - c0);
        const State c = chunk_stats<T, acc_t>(xr + c0, len);
        st = merge(st, c);
        if (smoothing) {
          const auto [a, wsum] = chunk_gaps<T, acc_t>(xr + c0, len, static_cast<acc_t>(c.m),
                                                      weight == nullptr ? nullptr : weight + c0);
          chunk_m.push_back(c.m);
          chunk_a.push_back(a);
          chunk_w.push_back(wsum);
        }
      }
      const double log_rest = std::log1p(st.s);
      const double nll = (st.m - static_cast<double>(static_cast<acc_t>(xr[class_of(r)]))) + log_rest;
      double gaps = 0, total_w = 0;
      for (size_t k = 0; k < chunk_m.size(); ++k) {
        gaps += chunk_a[k] +
                (chunk_w[k] > 0 && st.m != chunk_m[k] ? (st.m - chunk_m[k]) * chunk_w[k] : 0.0);
        total_w += chunk_w[k];
      }
      emit(r, nll, smoothing ? gaps + total_w * log_rest : 0.0, finish_lse(st));
    }
  });
}

template <typename T>
void cross_entropy_forward_typed(const T* x, int64_t x_stride, const int64_t* target,
                                 const acc_of<T>* weight, int64_t rows, int64_t classes,
                                 bool smoothing, double* nll, double* smooth, double* lse) {
  for (int64_t r = 0; r < rows; ++r) check_target(target[r], classes);
  cross_entropy_rows(
      x, x_stride, [=](int64_t r) { return target[r]; }, weight, rows, classes, smoothing,
      [=](int64_t r, double n, double sm, double l) {
        nll[r] = n;
        smooth[r] = sm;
        lse[r] = l;
      });
}

// What the loss's forward and backward need of the targets, in one pass in row order: every
// counted target checked (the first bad one in row order raises, as torch), and counts =
// (sum of counted w_t, counted rows, W) (stablekernels/cross_entropy_rows.h).
template <typename acc_t>
void check_and_count_targets(const int64_t* target, const acc_t* weight, int64_t rows,
                             const CrossEntropyOptions& o, double* counts) {
  double weights = 0, counted = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target[r];
    TORCH_CHECK_INDEX(target_in_range(t, o), "Target ", t, " is out of bounds.");
    if (row_counts(t, o)) {
      weights += weight == nullptr ? 1.0 : static_cast<double>(weight[t]);
      counted += 1;
    }
  }
  double total = static_cast<double>(o.classes);
  if (weight != nullptr) {
    total = 0;
    for (int64_t c = 0; c < o.classes; ++c) total += static_cast<double>(weight[c]);
  }
  counts[0] = weights;
  counts[1] = counted;
  counts[2] = total;
}

// The loss (per row, or reduced in row order in fp64: the same for every thread count), lse
// and counts: the pieces of each row and the epilogue of stablekernels/cross_entropy_rows.h.
template <typename T>
void cross_entropy_loss_typed(const T* x, int64_t x_stride, const int64_t* target,
                              const acc_of<T>* weight, int64_t rows, const CrossEntropyOptions& o,
                              acc_of<T>* loss, double* lse, double* counts) {
  using acc_t = acc_of<T>;
  check_and_count_targets(target, weight, rows, o, counts);
  const bool smoothing = o.label_smoothing != 0;
  auto class_of = [=](int64_t r) { return readable_target(target[r], o); };
  auto w_t = [=](int64_t t) { return weight == nullptr ? 1.0 : static_cast<double>(weight[t]); };
  if (o.reduction == Reduction::kNone) {
    cross_entropy_rows(x, x_stride, class_of, weight, rows, o.classes, smoothing,
                       [=](int64_t r, double nll, double smooth, double l) {
                         const int64_t t = target[r];
                         lse[r] = l;
                         loss[r] = static_cast<acc_t>(
                             row_loss(nll, smooth, l, w_t(readable_target(t, o)), row_counts(t, o), o));
                       });
    return;
  }
  std::vector<double> nlls(rows), smooths(rows);
  cross_entropy_rows(x, x_stride, class_of, weight, rows, o.classes, smoothing,
                     [&](int64_t r, double nll, double smooth, double l) {
                       nlls[r] = nll;
                       smooths[r] = smooth;
                       lse[r] = l;
                     });
  LossTotals totals;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target[r];
    totals.add(nlls[r], smooths[r], lse[r], w_t(readable_target(t, o)), row_counts(t, o), o);
  }
  loss[0] = static_cast<acc_t>(totals.result(o));
}

// dx_c = exp((x_c - hi) - lo) * coef - smooth * w_c - [c == t] * one_hot, a pure map over
// the logits from each row's terms and class: row_of(r) -> (RowTerms<acc_t>, t). The target's
// entry is written once more with its one-hot term.
template <typename T, typename RowOf>
void cross_entropy_map(const T* x, int64_t x_stride, const acc_of<T>* weight, int64_t rows,
                       int64_t classes, T* dx, RowOf row_of) {
  using acc_t = acc_of<T>;
  using io = IO<T, acc_t>;
  using V = Vectorized<acc_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / classes);
  const Store mode = store_for(rows * classes * int64_t(sizeof(T)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      T* dr = dx + r * classes;
      const auto [k, t] = row_of(r);
      const acc_t hi = k.hi, lo = k.lo, coef = k.coef, smooth = k.smooth, one_hot = k.one_hot;
      const V vhi(hi), vlo(lo), vcoef(coef), vsmooth(smooth);
      // The target's logit is read before the row is written: dx may be x itself (the
      // in-place op), every other element being read just before it is written.
      const acc_t x_t = static_cast<acc_t>(xr[t]);
      auto probability = [=](int64_t j, int64_t count) {
        return exp_nan_safe((io::load(xr + j, count) - vhi) - vlo);
      };
      if (weight == nullptr) {
        store_each<acc_t>(
            dr, classes,
            [=](int64_t j, int64_t count) {
              return at::vec::fmsub(probability(j, count), vcoef, vsmooth);
            },
            mode);
      } else {
        store_each<acc_t>(
            dr, classes,
            [=](int64_t j, int64_t count) {
              return at::vec::fmsub(probability(j, count), vcoef,
                                    vsmooth * V::loadu(weight + j, count));
            },
            mode);
      }
      const acc_t p = std::exp((x_t - hi) - lo);
      const acc_t w_t = weight == nullptr ? acc_t(1) : weight[t];
      dr[t] = static_cast<T>(p * coef - smooth * w_t - one_hot);
    }
  });
}

// The map from per-row terms (rows, 5) = (hi, lo, coef, smooth, one_hot) the caller computed.
template <typename T>
void cross_entropy_backward_typed(const T* x, int64_t x_stride, const int64_t* target,
                                  const acc_of<T>* weight, const acc_of<T>* terms, int64_t rows,
                                  int64_t classes, T* dx) {
  using acc_t = acc_of<T>;
  for (int64_t r = 0; r < rows; ++r) check_target(target[r], classes);
  cross_entropy_map(x, x_stride, weight, rows, classes, dx, [=](int64_t r) {
    const acc_t* k = terms + r * 5;
    return std::make_pair(RowTerms<acc_t>{k[0], k[1], k[2], k[3], k[4]}, target[r]);
  });
}

// The loss's backward: each row's terms from the loss's gradient (row_gradient, row_terms of
// stablekernels/cross_entropy_rows.h), then the map. grad_stride 0: one gradient for every
// row (a reduced loss); grad_lse may be null.
template <typename T>
void cross_entropy_loss_backward_typed(const acc_of<T>* grad, int64_t grad_stride,
                                       const double* grad_lse, int64_t grad_lse_stride,
                                       const T* x, int64_t x_stride, const int64_t* target,
                                       const acc_of<T>* weight, const double* lse,
                                       const double* counts, int64_t rows,
                                       const CrossEntropyOptions& o, T* dx) {
  using acc_t = acc_of<T>;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_INDEX(target_in_range(target[r], o), "Target ", target[r], " is out of bounds.");
  }
  cross_entropy_map(x, x_stride, weight, rows, o.classes, dx, [=](int64_t r) {
    const int64_t t = readable_target(target[r], o);
    const RowGradient g =
        row_gradient(static_cast<double>(grad[r * grad_stride]), row_counts(target[r], o), counts, o);
    const double w_t = weight == nullptr ? 1.0 : static_cast<double>(weight[t]);
    const double g_lse = grad_lse == nullptr ? 0.0 : grad_lse[r * grad_lse_stride];
    return std::make_pair(row_terms<acc_t>(g, g_lse, lse[r], w_t, counts[2], o), t);
  });
}

// ---------------------------------------------------------------------------------------
// Masked softmax (attention): each row's t = scale * x + mask is formed in a per-thread
// buffer of the accumulation dtype (x and the mask read once, the mask by its strides), then
// taken by the row kernels above as a row of acc_t: one read of x, one write of y. A causal
// row forms and exponentiates only its first `limit` elements; the rest is written as 0
// (-inf for log_softmax).

// t[j] = scale * x[j] (+ mask[j * ms] if additive; -inf where a bool mask is false), j < len.
template <typename T, typename M, typename acc_t>
void masked_terms(const T* __restrict__ x, const M* __restrict__ mask, int64_t ms, acc_t scale,
                  acc_t* __restrict__ t, int64_t len) {
  constexpr acc_t kDropped = -std::numeric_limits<acc_t>::infinity();
  if (mask == nullptr) {
    for (int64_t j = 0; j < len; ++j) t[j] = scale * static_cast<acc_t>(x[j]);
  } else if constexpr (std::is_same_v<M, bool>) {
    if (ms == 1) {
      for (int64_t j = 0; j < len; ++j)
        t[j] = mask[j] ? scale * static_cast<acc_t>(x[j]) : kDropped;
    } else {
      for (int64_t j = 0; j < len; ++j)
        t[j] = mask[j * ms] ? scale * static_cast<acc_t>(x[j]) : kDropped;
    }
  } else if (ms == 1) {
    for (int64_t j = 0; j < len; ++j) t[j] = scale * static_cast<acc_t>(x[j]) + mask[j];
  } else {
    for (int64_t j = 0; j < len; ++j) t[j] = scale * static_cast<acc_t>(x[j]) + mask[j * ms];
  }
}

template <typename T, typename U, typename M>
void masked_softmax_typed(const T* x, U* y, int64_t rows, int64_t n, const RowMask& mask,
                          double scale, bool causal, int64_t query_len, int64_t causal_offset,
                          int mode, double* lse) {
  using acc_t = acc_of<T, U>;
  const acc_t s = static_cast<acc_t>(scale);
  const M* mask_data = static_cast<const M*>(mask.data);
  const bool log = mode == 1;
  const Store store = store_for(mode == 2 ? 0 : rows * n * int64_t(sizeof(U)));
  const acc_t dropped = log ? -infinity<acc_t>() : acc_t(0);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<acc_t> terms;
    if (static_cast<int64_t>(terms.size()) < n) terms.resize(n);
    acc_t* t = terms.data();
    for (int64_t r = begin; r < end; ++r) {
      int64_t limit = n;
      if (causal) limit = std::clamp<int64_t>(r % query_len + causal_offset + 1, 0, n);
      const M* m = mask_data == nullptr ? nullptr : mask_data + mask.offset(r);
      masked_terms<T, M, acc_t>(x + r * n, m, mask.col_stride, s, t, limit);
      U* yr = mode == 2 ? nullptr : y + r * n;
      State st = State::empty();
      if (limit > 0) {
        st = mode == 2 ? segment_stats<acc_t, acc_t>(t, limit)
                       : softmax_row<acc_t, U>(t, yr, limit, log, store);
      }
      // Nothing kept (every t_j = -inf): 0 / -inf throughout, lse -inf (not torch's NaN).
      const bool dead = st.m == -std::numeric_limits<double>::infinity() && !std::isnan(st.s);
      lse[r] = dead ? st.m : finish_lse<double>(st);
      if (mode == 2) continue;
      if (dead) {
        fill_row<acc_t>(yr, n, dropped, store);
      } else if (limit < n) {
        if (row_is_nan(st)) {
          store_nan<acc_t>(yr + limit, n - limit, store);
        } else {
          fill_row<acc_t>(yr + limit, n - limit, dropped, store);
        }
      }
    }
  });
}

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
                            int64_t query_len, int64_t causal_offset, int mode, double* lse) {
  SK_DISPATCH(x_type, "stablekernels masked_softmax", [&] {
    using T = scalar_t;
    SK_DISPATCH(y_type, "stablekernels masked_softmax", [&] {
      using U = scalar_t;
      using acc_t = acc_of<T, U>;
      const auto* xt = static_cast<const T*>(x);
      auto* yt = static_cast<U*>(y);
      if (mask.data != nullptr && mask.additive) {
        masked_softmax_typed<T, U, acc_t>(xt, yt, rows, n, mask, scale, causal, query_len,
                                          causal_offset, mode, lse);
      } else {
        masked_softmax_typed<T, U, bool>(xt, yt, rows, n, mask, scale, causal, query_len,
                                         causal_offset, mode, lse);
      }
    });
  });
}

#undef SK_DISPATCH

}  // namespace

extern const KernelTable kTable;
const KernelTable kTable = {SK_CAPABILITY_NAME,     softmax_forward,       logsumexp_forward,
                            softmax_backward,       logsumexp_backward,    cross_entropy_forward,
                            cross_entropy_backward, masked_softmax_forward, cross_entropy_loss,
                            cross_entropy_loss_backward};

}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
