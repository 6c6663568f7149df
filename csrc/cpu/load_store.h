// Memory access of the CPU kernels: streaming (non-temporal) stores and when a call uses them
// (store_for), loads and stores of a vector's worth of any dtype as the accumulation dtype
// (IO), and the row writers store_each, fill_row and store_nan.
// Part of kernels_impl.h, compiled once per CPU capability: it opens that file's namespace
// (one copy per capability) and is not compiled on its own.

#pragma once

#ifndef SK_CAPABILITY_NAMESPACE
#error "this header is part of kernels_impl.h: include that, with SK_CAPABILITY_NAMESPACE set"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "vec_math.h"

namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE {
namespace {

constexpr int64_t kLineBytes = 64;  // a cache line

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

// ---------------------------------------------------------------------------------------
// Row writers: a vector of values at a time over a row, cached or streamed.

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

}  // namespace
}  // namespace stablekernels::cpu::SK_CAPABILITY_NAMESPACE
