// C++ unit tests of the CPU kernels, run by ctest: the online (m, s') state and its merge
// rule, and every kernel of every capability build this CPU can run, against plain
// double-precision loops, on odd lengths and special values. No tensors: the kernels'
// raw-pointer interface (csrc/cpu/kernels.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <stablekernels/online_softmax.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../cpu/kernels.h"

using stablekernels::CrossEntropyOptions;
using stablekernels::finish_lse;
using stablekernels::Layout;
using stablekernels::merge;
using stablekernels::Reduction;
using stablekernels::RowState;
using stablekernels::cpu::KernelTable;

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

const double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// Equal within rtol (relative to |want|) + atol, NaN equal to NaN, infinities exact.
bool close(double got, double want, double rtol, double atol = 0) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

// ---------------------------------------------------------------------------------------
// Double-precision references of one row.

struct Ref {
  std::vector<double> softmax, log_softmax;
  double lse;
  double max = -std::numeric_limits<double>::infinity();

  // The tolerance of a softmax entry in fp32: exp magnifies the rounding of x - m by |x - m|.
  double softmax_rtol(double x) const {
    return std::isfinite(x) ? 1e-6 * (1 + std::fabs(x - max)) : 1e-6;
  }
};

Ref reference(const std::vector<double>& x) {
  Ref r;
  double m = -kInf;
  bool nan = false, posinf = false;
  for (double v : x) {
    nan |= std::isnan(v);
    posinf |= v == kInf;
    if (v > m) m = v;
  }
  r.max = m;
  const size_t n = x.size();
  if (nan || posinf || m == -kInf) {
    r.softmax.assign(n, kNaN);
    r.log_softmax.assign(n, kNaN);
    r.lse = nan ? kNaN : (posinf ? kInf : -kInf);
    return r;
  }
  // s' with one max left out, in long double.
  long double rest = 0;
  bool skipped = false;
  for (double v : x) {
    if (v == m && !skipped) {
      skipped = true;
      continue;
    }
    rest += std::exp(static_cast<long double>(v - m));
  }
  for (double v : x) {
    r.softmax.push_back(
        static_cast<double>(std::exp(static_cast<long double>(v - m)) / (1 + rest)));
    r.log_softmax.push_back(static_cast<double>((v - m) - std::log1p(rest)));
  }
  r.lse = static_cast<double>(m + std::log1p(rest));
  return r;
}

// ---------------------------------------------------------------------------------------

// The two-pass form (max first, then SumsAtMax) gives the online state, special values and
// -inf padding included.
void test_two_pass_state() {
  using stablekernels::state_at_max;
  using stablekernels::SumsAtMax;
  using S = RowState<double>;
  const std::vector<std::vector<double>> rows = {
      {0.5, -3.0, 2.0, 2.0, -kInf, 1.25, -20.0},
      {-kInf, -kInf, -kInf},
      {1.0, kInf, 2.0, kInf},
      {1.0, kNaN, 2.0},
      {-kInf, kNaN},
      {kNaN, kNaN},
      {0.0, -20.0},
  };
  for (size_t r = 0; r < rows.size(); ++r) {
    const auto& row = rows[r];
    S online = S::empty();
    for (double v : row) online.update(v);
    for (int pad = 0; pad <= 3; pad += 3) {  // a kernel pads its registers with -inf
      std::vector<double> padded = row;
      padded.insert(padded.end(), pad, -kInf);
      double m = -kInf;
      for (double v : padded) m = std::fmax(m, v);
      SumsAtMax<double> sums = SumsAtMax<double>::empty();
      for (double v : padded) sums.add(v, m);
      const S two = state_at_max(m, sums, static_cast<double>(row.size()));
      const std::string what =
          "two-pass state of row " + std::to_string(r) + " pad " + std::to_string(pad);
      if (std::isnan(online.s)) {
        expect(std::isnan(two.s), what + " (NaN)");
      } else {
        expect(two.m == online.m && close(two.s, online.s, 1e-15), what);
      }
      expect(close(finish_lse(two), finish_lse(online), 1e-15), what + " logsumexp");
    }
  }
  // s' of [0, -20] keeps exp(-20) to full relative precision: the max is counted, not added.
  SumsAtMax<double> sums = SumsAtMax<double>::empty();
  sums.add(0.0, 0.0);
  sums.add(-20.0, 0.0);
  expect(state_at_max(0.0, sums, 2.0).s == std::exp(-20.0), "s' of [0, -20], two-pass");
  expect(state_at_max(-kInf, SumsAtMax<double>::empty(), 0.0).s == -1, "no elements: empty");
}

void test_online_state() {
  using S = RowState<double>;
  const std::vector<double> row = {0.5, -3.0, 2.0, 2.0, -kInf, 1.25, -20.0};
  S seq = S::empty();
  for (double v : row) seq.update(v);
  // Any split, merged in either order, gives the same state.
  for (size_t cut = 0; cut <= row.size(); ++cut) {
    S a = S::empty(), b = S::empty();
    for (size_t i = 0; i < cut; ++i) a.update(row[i]);
    for (size_t i = cut; i < row.size(); ++i) b.update(row[i]);
    const S ab = merge(a, b), ba = merge(b, a);
    expect(ab.m == seq.m && close(ab.s, seq.s, 1e-15), "merge(a, b) at cut " + std::to_string(cut));
    expect(ba.m == seq.m && close(ba.s, seq.s, 1e-15), "merge(b, a) at cut " + std::to_string(cut));
  }
  expect(close(finish_lse(seq), reference(row).lse, 1e-15), "online logsumexp");
  // The max term is left out: [0, -20] keeps log_softmax[0] = -log1p(e^-20) exactly.
  S small = S::empty();
  small.update(0.0);
  small.update(-20.0);
  expect(close(-std::log1p(small.s), -std::log1p(std::exp(-20.0)), 1e-15), "s' of [0, -20]");
  // Empty state, ties and infinities.
  const S e = S::empty();
  expect(merge(e, e).m == -kInf && merge(e, e).s == -1, "empty + empty is empty");
  expect(finish_lse(e) == -kInf, "logsumexp of nothing is -inf");
  S inf2 = S::empty();
  inf2.update(kInf);
  inf2.update(kInf);
  inf2.update(3.0);
  expect(inf2.m == kInf && inf2.s == 1 && finish_lse(inf2) == kInf, "two +inf");
  S neg = S::empty();
  for (int i = 0; i < 4; ++i) neg.update(-kInf);
  expect(neg.m == -kInf && finish_lse(neg) == -kInf, "all -inf");
  S with_nan = S::empty();
  with_nan.update(1.0);
  with_nan.update(kNaN);
  with_nan.update(2.0);
  expect(std::isnan(finish_lse(with_nan)), "NaN poisons the state");
  // An infinite max with a NaN s' is NaN, not the max: NaN wins over +inf, as in torch.
  expect(std::isnan(finish_lse(RowState<double>{kInf, kNaN})), "NaN with +inf");
  // A float state finished in double keeps the float max exactly: 1e6 + log1p(1).
  const RowState<float> big{1e6f, 1.0f};
  expect(finish_lse<double>(big) == 1e6 + static_cast<double>(std::log1p(1.0f)),
         "float state finished in double");
}

// ---------------------------------------------------------------------------------------

std::vector<std::vector<double>> make_rows(int64_t n, std::mt19937& gen) {
  std::normal_distribution<double> normal(0.0, 4.0);
  std::vector<std::vector<double>> rows;
  for (int kind = 0; kind < 8; ++kind) {
    std::vector<double> r(n);
    for (auto& v : r) v = static_cast<float>(normal(gen));  // values exact in fp32
    if (kind == 1) r[n / 2] = kInf;
    if (kind == 2) r[n - 1] = kNaN;
    if (kind == 3) r.assign(n, -kInf);
    if (kind == 4 && n > 1) r[0] = -kInf;
    if (kind == 5) {
      for (auto& v : r) v += 1e6;  // large offset
      for (auto& v : r) v = static_cast<float>(v);
    }
    if (kind == 6) r[n / 3] = r[n - 1] = 60.0;  // a tie at a large max
    if (kind == 7 && n > 1) {
      r.assign(n, -40.0);
      r[n - 1] = 0.0;  // one confident entry: log_softmax there is tiny
    }
    rows.push_back(r);
  }
  return rows;
}

// ---------------------------------------------------------------------------------------
// Cross-entropy statistics, against long double loops. Per row, with m the max and s' the
// sum with one max term left out: nll = (m - x_t) + log1p(s') and smooth = sum_c w_c (m - x_c)
// + W log1p(s'). Both are formed from gaps m - x >= 0 and log1p(s'), never as lse - x_t,
// which would cancel: a confident row's nll (down to 1e-17 here) keeps its relative precision.

struct CeRef {
  double nll, smooth, lse;
  bool finite_max;  // nll and smooth are only defined then
};

CeRef ce_reference(const std::vector<double>& x, int64_t t, const std::vector<double>* w) {
  const Ref ref = reference(x);
  CeRef out{0, 0, ref.lse, std::isfinite(ref.max) && !std::isnan(ref.lse)};
  if (!out.finite_max) return out;
  const double m = ref.max;
  long double rest = 0, gaps = 0, total_w = 0;
  bool skipped = false;
  for (size_t c = 0; c < x.size(); ++c) {
    const long double wc = w ? (*w)[c] : 1.0L;
    if (x[c] == m && !skipped) {
      skipped = true;
    } else {
      rest += std::exp(static_cast<long double>(x[c] - m));
    }
    gaps += wc * (m - static_cast<long double>(x[c]));  // +inf for a -inf logit
    total_w += wc;
  }
  const long double log_rest = std::log1p(rest);
  out.nll = static_cast<double>((m - static_cast<long double>(x[t])) + log_rest);
  out.smooth = static_cast<double>(gaps + total_w * log_rest);
  return out;
}

// Rows of `classes` logits at a stride of classes + 3 (a slice of a wider tensor), of every
// kind of make_rows, in fp32 and fp64, with and without class weights and smoothing.
template <typename T>
void test_cross_entropy_forward_typed(const KernelTable& t, c10::ScalarType type,
                                      const char* name) {
  const std::string what = std::string(t.capability) + " cross_entropy " + name;
  std::mt19937 gen(99);
  std::uniform_real_distribution<double> uniform(0.5, 2.0);
  for (int64_t classes : {1, 7, 33, 1000, 16384 + 5, 40000}) {
    const auto rows = make_rows(classes, gen);
    const int64_t n_rows = static_cast<int64_t>(rows.size()), stride = classes + 3;
    std::vector<T> x(n_rows * stride, T(0));
    std::vector<int64_t> target(n_rows);
    std::vector<std::vector<double>> exact(n_rows);  // the rows as the kernel sees them
    for (int64_t r = 0; r < n_rows; ++r) {
      for (int64_t c = 0; c < classes; ++c) {
        x[r * stride + c] = static_cast<T>(rows[r][c]);
        exact[r].push_back(static_cast<double>(x[r * stride + c]));
      }
      // Row kind 7 is confident in its last class: aim there for the tiny nll.
      target[r] = r == 7 ? classes - 1 : (r * 7 + 1) % classes;
    }
    std::vector<T> w(classes);
    std::vector<double> w64(classes);
    for (int64_t c = 0; c < classes; ++c) w64[c] = static_cast<double>(w[c] = uniform(gen));
    for (bool weighted : {false, true}) {
      for (bool smoothing : {false, true}) {
        std::vector<double> nll(n_rows), smooth(n_rows), lse(n_rows);
        t.cross_entropy_forward(x.data(), type, stride, target.data(),
                                weighted ? w.data() : nullptr, n_rows, classes, smoothing,
                                nll.data(), smooth.data(), lse.data());
        for (int64_t r = 0; r < n_rows; ++r) {
          const CeRef ref = ce_reference(exact[r], target[r], weighted ? &w64 : nullptr);
          // fp32 sums of exps, blocks of fp32 gaps: a few 1e-7 relative; fp64 far better.
          const double rtol = sizeof(T) == 4 ? 2e-6 : 1e-12;
          bool ok = close(lse[r], ref.lse, rtol, rtol);
          if (ref.finite_max) {
            ok = ok && close(nll[r], ref.nll, rtol, 1e-300);
            ok = ok && (smoothing ? close(smooth[r], ref.smooth, rtol) : smooth[r] == 0.0);
          }
          expect(ok, what + " C=" + std::to_string(classes) + " row kind " + std::to_string(r) +
                         (weighted ? " weighted" : "") + (smoothing ? " smoothing" : ""));
        }
      }
    }
  }
}

void test_cross_entropy_forward(const KernelTable& t) {
  test_cross_entropy_forward_typed<float>(t, c10::ScalarType::Float, "fp32");
  test_cross_entropy_forward_typed<double>(t, c10::ScalarType::Double, "fp64");
}

// The backward is a pure map of the per-row terms the router computes: any terms do. hi and
// lo are the split lse of the row (so exp stays in range), the other terms random.
void test_cross_entropy_backward(const KernelTable& t) {
  std::mt19937 gen(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int64_t classes : {1, 5, 64, 1001}) {
    const int64_t n_rows = 6, stride = classes + 1;
    std::vector<float> x(n_rows * stride), dx(n_rows * classes), terms(n_rows * 5);
    std::vector<float> w(classes);
    std::vector<int64_t> target(n_rows);
    for (auto& v : x) v = static_cast<float>(2 * normal(gen));
    for (auto& v : w) v = static_cast<float>(1 + 0.5 * std::fabs(normal(gen)));
    for (int64_t r = 0; r < n_rows; ++r) {
      std::vector<double> row(x.begin() + r * stride, x.begin() + r * stride + classes);
      const double lse = reference(row).lse;
      const float hi = static_cast<float>(lse);
      float* k = terms.data() + r * 5;
      k[0] = hi;
      k[1] = static_cast<float>(lse - hi);
      k[2] = static_cast<float>(normal(gen));        // coef
      k[3] = static_cast<float>(0.1 * normal(gen));  // smooth
      k[4] = static_cast<float>(normal(gen));        // one_hot
      target[r] = (r * 3) % classes;
    }
    for (bool weighted : {false, true}) {
      t.cross_entropy_backward(x.data(), c10::ScalarType::Float, stride, target.data(),
                               weighted ? w.data() : nullptr, terms.data(), n_rows, classes,
                               dx.data());
      bool ok = true;
      for (int64_t r = 0; r < n_rows && ok; ++r) {
        const float* k = terms.data() + r * 5;
        for (int64_t c = 0; c < classes && ok; ++c) {
          const double wc = weighted ? w[c] : 1.0;
          const double p = std::exp((static_cast<double>(x[r * stride + c]) - k[0]) - k[1]);
          const double hot = c == target[r] ? k[4] : 0.0;
          const double want = p * k[2] - k[3] * wc - hot;
          // fp32 terms: a few ulp of the largest of them (the difference may cancel).
          const double scale = std::fabs(p * k[2]) + std::fabs(k[3] * wc) + std::fabs(hot);
          ok = std::fabs(dx[r * classes + c] - want) <= 1e-6 * scale + 1e-30;
        }
      }
      expect(ok, std::string(t.capability) + " cross_entropy backward C=" +
                     std::to_string(classes) + (weighted ? " weighted" : ""));
    }
  }
}

// The fp32 exp of the kernels (exp_fp32 in cpu/vec_math.h), over every float t in [-104, 0]
// (x - max ranges there in every kernel; exp(-104) is below the smallest subnormal), through
// logsumexp_backward with grad 1 and lse 0, which writes exp(x) itself: within kExpMaxUlp ulp
// of the double exp where that is at least 2^-125, and in [0, 2^-125] below it (flushed).
// Measured: 1.98 ulp with fused multiply-adds (AVX2, AVX512), 2.28 without (DEFAULT).
constexpr double kExpMaxUlp = 2.5;  // docs/numerics.md states this bound

void test_exp_ulp(const KernelTable& t) {
  const int64_t batch = int64_t(1) << 22;
  std::vector<float> x(batch), dx(batch);
  const float one = 1.0f;
  const double zero = 0.0;
  double worst = 0, worst_at = 0;
  int64_t bad_flush = 0, total = 0;
  uint32_t bits = 0x80000000u;  // -0.0, then down to -104 (0xC2D00000)
  const uint32_t last = 0xC2D00000u;
  while (bits <= last) {
    int64_t count = 0;
    for (; count < batch && bits <= last; ++count, ++bits) std::memcpy(&x[count], &bits, 4);
    t.logsumexp_backward(&one, 0, &zero, x.data(), c10::ScalarType::Float, dx.data(),
                         Layout{1, count, 1, count});
    // Checked in parallel (the double exps dominate): per thread, then combined.
    std::vector<double> part_worst(at::get_num_threads(), 0), part_at(part_worst.size(), 0);
    std::vector<int64_t> part_bad(part_worst.size(), 0);
    at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
      const int k = at::get_thread_num();
      for (int64_t i = begin; i < end; ++i) {
        const double want = std::exp(static_cast<double>(x[i]));
        if (want < 0x1p-125) {
          part_bad[k] += !(dx[i] >= 0 && dx[i] <= 0x1p-125);
          continue;
        }
        int e;
        std::frexp(want, &e);
        const double ulps = std::fabs(dx[i] - want) / std::ldexp(1.0, e - 24);
        if (ulps > part_worst[k]) {
          part_worst[k] = ulps;
          part_at[k] = x[i];
        }
      }
    });
    for (size_t k = 0; k < part_worst.size(); ++k) {
      bad_flush += part_bad[k];
      if (part_worst[k] > worst) {
        worst = part_worst[k];
        worst_at = part_at[k];
      }
    }
    total += count;
  }
  std::printf("%s exp: max %.3f ulp (at %.9g) over %lld floats in [-104, 0]\n", t.capability, worst,
              worst_at, static_cast<long long>(total));
  expect(worst <= kExpMaxUlp, std::string(t.capability) + " exp within " +
                                  std::to_string(kExpMaxUlp) + " ulp on [-104, 0]");
  expect(bad_flush == 0, std::string(t.capability) + " exp flushes only below 2^-125");
}

// The fused loss's counts = (sum of counted w_t, counted rows, W), W only with label
// smoothing (0 without: it is not summed), for every reduction; and its target check: the
// first bad counted target in row order raises, after the rows' walk read nothing outside a
// row.
void test_cross_entropy_loss_counts(const KernelTable& t) {
  const std::string what = std::string(t.capability) + " cross_entropy_loss counts";
  const int64_t rows = 6, classes = 5, ignored = -1;
  std::vector<float> x(rows * classes), w(classes);
  for (int64_t i = 0; i < rows * classes; ++i) x[i] = static_cast<float>((i * 37) % 11) / 3.0f;
  for (int64_t c = 0; c < classes; ++c) w[c] = 0.5f + 0.25f * static_cast<float>(c);
  std::vector<int64_t> target = {0, ignored, 4, 2, ignored, 3};
  for (bool weighted : {false, true}) {
    double counted_w = 0, total_w = 0;
    for (int64_t tr : target) counted_w += tr == ignored ? 0.0 : weighted ? w[tr] : 1.0;
    for (int64_t c = 0; c < classes; ++c) total_w += weighted ? w[c] : 1.0;
    for (Reduction reduction : {Reduction::kNone, Reduction::kMean, Reduction::kSum}) {
      for (double e : {0.0, 0.1}) {
        const CrossEntropyOptions o{classes, ignored, e, 0.0, reduction};
        std::vector<float> loss(rows);
        std::vector<double> lse(rows), counts(3, std::nan(""));
        t.cross_entropy_loss(x.data(), c10::ScalarType::Float, classes, target.data(),
                             weighted ? w.data() : nullptr, rows, o, loss.data(), lse.data(),
                             counts.data());
        const bool ok = counts[0] == counted_w && counts[1] == 4.0 &&
                        counts[2] == (e != 0 ? total_w : 0.0);
        expect(ok, what + " reduction " + std::to_string(static_cast<int>(reduction)) +
                       (weighted ? " weighted" : "") + (e != 0 ? " smoothing" : ""));
        std::vector<int64_t> bad = target;
        bad[2] = classes;  // the first bad one in row order
        bad[5] = -7;
        bool raised = false;
        try {
          t.cross_entropy_loss(x.data(), c10::ScalarType::Float, classes, bad.data(),
                               weighted ? w.data() : nullptr, rows, o, loss.data(), lse.data(),
                               counts.data());
        } catch (const c10::IndexError& error) {
          raised = std::string(error.what_without_backtrace()).rfind("Target 5 is out", 0) == 0;
        }
        expect(raised, what + " bad target raised, reduction " +
                           std::to_string(static_cast<int>(reduction)));
      }
    }
  }
}

void test_table(const KernelTable& t) {
  const std::string cap = t.capability;
  std::mt19937 gen(1234);
  for (int64_t n : {1, 2, 3, 15, 16, 17, 33, 1023, 16384, 16385, 40000, 300000}) {
    const auto rows = make_rows(n, gen);
    const int64_t outer = static_cast<int64_t>(rows.size());
    std::vector<float> x(outer * n), y(outer * n), out(outer), dx(outer * n);
    std::vector<double> lse(outer);
    for (int64_t r = 0; r < outer; ++r) {
      for (int64_t j = 0; j < n; ++j) x[r * n + j] = static_cast<float>(rows[r][j]);
    }
    const Layout L{outer, n, 1, n};
    for (bool log : {false, true}) {
      t.softmax_forward(x.data(), c10::ScalarType::Float, y.data(), c10::ScalarType::Float, L, log);
      for (int64_t r = 0; r < outer; ++r) {
        const Ref ref = reference(rows[r]);
        const auto& want = log ? ref.log_softmax : ref.softmax;
        bool ok = true;
        for (int64_t j = 0; j < n && ok; ++j) {
          // fp32: a few ulp, scaled for softmax by the exp's magnification of x - m.
          const double atol = log ? 0 : 1e-40;
          ok = close(y[r * n + j], want[j], log ? 1e-6 : ref.softmax_rtol(rows[r][j]), atol);
        }
        expect(ok, cap + (log ? " log_softmax" : " softmax") + " n=" + std::to_string(n) +
                       " row kind " + std::to_string(r));
      }
    }
    t.logsumexp_forward(x.data(), c10::ScalarType::Float, out.data(), lse.data(), L);
    for (int64_t r = 0; r < outer; ++r) {
      const double want = reference(rows[r]).lse;
      expect(close(lse[r], want, 2e-7, 1e-6) && close(out[r], want, 2e-7, 1e-6),
             cap + " logsumexp n=" + std::to_string(n) + " row kind " + std::to_string(r));
    }
    // Backward of logsumexp: dx = g * exp(x - lse) = g * softmax, from the fp64 lse (split
    // into float hi + lo inside: x - hi is exact near the lse, so the large-offset rows keep
    // their precision); one gradient for every row (stride 0).
    const float g = 1.5f;
    t.logsumexp_backward(&g, 0, lse.data(), x.data(), c10::ScalarType::Float, dx.data(), L);
    for (int64_t r = 0; r < outer; ++r) {
      const Ref ref = reference(rows[r]);
      bool ok = true;
      for (int64_t j = 0; j < n && ok; ++j) {
        if (std::isnan(ref.lse) || std::isinf(ref.lse))
          break;  // torch's NaN/0 rules, tested in Python
        ok = close(dx[r * n + j], 1.5 * ref.softmax[j], 1e-5, 1e-30);
      }
      expect(ok, cap + " logsumexp backward n=" + std::to_string(n));
    }
  }

  // Strided rows (inner > 1) and bf16 in, fp32 out: every lane against the double loop.
  for (int64_t inner : {2, 17, 40}) {
    const int64_t outer = 3, n = 257;
    std::normal_distribution<double> normal(0.0, 4.0);
    std::vector<c10::BFloat16> x(outer * n * inner);
    for (auto& v : x) v = c10::BFloat16(static_cast<float>(normal(gen)));
    x[5] = c10::BFloat16(std::numeric_limits<float>::infinity());
    std::vector<float> y(x.size());
    const Layout L{outer, n, inner, n * inner};
    t.softmax_forward(x.data(), c10::ScalarType::BFloat16, y.data(), c10::ScalarType::Float, L,
                      false);
    bool ok = true;
    for (int64_t o = 0; o < outer && ok; ++o) {
      for (int64_t i = 0; i < inner && ok; ++i) {
        std::vector<double> row(n);
        for (int64_t j = 0; j < n; ++j)
          row[j] = static_cast<float>(x[o * n * inner + j * inner + i]);
        const Ref ref = reference(row);
        for (int64_t j = 0; j < n && ok; ++j) {
          ok = close(y[o * n * inner + j * inner + i], ref.softmax[j], ref.softmax_rtol(row[j]),
                     1e-40);
        }
      }
    }
    expect(ok, cap + " strided bf16 -> fp32 softmax, inner=" + std::to_string(inner));
  }

  // softmax backward, dx = y * (dy - sum(dy * y)), against the double loop.
  {
    const int64_t n = 1000;
    std::vector<std::vector<double>> rows = make_rows(n, gen);
    const Ref ref = reference(rows[0]);
    std::vector<float> yv(n), dy(n), dxv(n);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (int64_t j = 0; j < n; ++j) {
      yv[j] = static_cast<float>(ref.softmax[j]);
      dy[j] = static_cast<float>(normal(gen));
    }
    t.softmax_backward(dy.data(), yv.data(), c10::ScalarType::Float, dxv.data(),
                       c10::ScalarType::Float, Layout{1, n, 1, n}, false);
    double dot = 0;
    for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(dy[j]) * yv[j];
    bool ok = true;
    for (int64_t j = 0; j < n && ok; ++j) {
      ok = close(dxv[j], yv[j] * (dy[j] - dot), 1e-5, 1e-9);
    }
    expect(ok, cap + " softmax backward");
  }

  test_cross_entropy_forward(t);
  test_cross_entropy_backward(t);
  test_cross_entropy_loss_counts(t);
}

}  // namespace

// Every check of a capability's kernels, with outputs stored plainly (the default for the
// small outputs here) and streamed past the caches (STABLEKERNELS_STREAMING_MIN_BYTES=0).
void test_table_both_stores(const KernelTable& t) {
  test_exp_ulp(t);
  unsetenv("STABLEKERNELS_STREAMING_MIN_BYTES");
  test_table(t);
  setenv("STABLEKERNELS_STREAMING_MIN_BYTES", "0", 1);
  test_table(t);
  unsetenv("STABLEKERNELS_STREAMING_MIN_BYTES");
}

int main() {
  test_online_state();
  test_two_pass_state();
  test_table_both_stores(stablekernels::cpu::capability_default::kTable);
#ifdef SK_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    test_table_both_stores(stablekernels::cpu::capability_avx2::kTable);
  } else {
    std::printf("skipped AVX2: not supported by this CPU\n");
  }
#endif
#ifdef SK_HAVE_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    test_table_both_stores(stablekernels::cpu::capability_avx512::kTable);
  } else {
    std::printf("skipped AVX512: not supported by this CPU\n");
  }
#endif
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
