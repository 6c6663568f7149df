// C++ unit tests of the CPU kernels, run by ctest: the online (m, s') state and its merge
// rule, and every kernel of every capability build this CPU can run, against plain
// double-precision loops, on odd lengths and special values. No tensors: the kernels'
// raw-pointer interface (csrc/cpu/kernels.h).
#include <c10/util/BFloat16.h>
#include <stablekernels/online_softmax.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../cpu/kernels.h"

using stablekernels::Layout;
using stablekernels::merge;
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
  expect(close(seq.logsumexp(), reference(row).lse, 1e-15), "online logsumexp");
  // The max term is left out: [0, -20] keeps log_softmax[0] = -log1p(e^-20) exactly.
  S small = S::empty();
  small.update(0.0);
  small.update(-20.0);
  expect(close(-std::log1p(small.s), -std::log1p(std::exp(-20.0)), 1e-15), "s' of [0, -20]");
  // Empty state, ties and infinities.
  const S e = S::empty();
  expect(merge(e, e).m == -kInf && merge(e, e).s == -1, "empty + empty is empty");
  expect(std::isinf(e.logsumexp()) && e.logsumexp() < 0, "logsumexp of nothing is -inf");
  S inf2 = S::empty();
  inf2.update(kInf);
  inf2.update(kInf);
  inf2.update(3.0);
  expect(inf2.m == kInf && inf2.s == 1 && inf2.logsumexp() == kInf, "two +inf");
  S neg = S::empty();
  for (int i = 0; i < 4; ++i) neg.update(-kInf);
  expect(neg.m == -kInf && neg.logsumexp() == -kInf, "all -inf");
  S with_nan = S::empty();
  with_nan.update(1.0);
  with_nan.update(kNaN);
  with_nan.update(2.0);
  expect(std::isnan(with_nan.logsumexp()), "NaN poisons the state");
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
    // Backward of logsumexp: dx = g * exp(x - lse) = g * softmax.
    std::vector<float> g(outer, 1.5f);
    t.logsumexp_backward(g.data(), lse.data(), x.data(), c10::ScalarType::Float, dx.data(), L);
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
}

}  // namespace

int main() {
  test_online_state();
  test_table(stablekernels::cpu::capability_default::kTable);
#ifdef SK_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    test_table(stablekernels::cpu::capability_avx2::kTable);
  } else {
    std::printf("skipped AVX2: not supported by this CPU\n");
  }
#endif
#ifdef SK_HAVE_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    test_table(stablekernels::cpu::capability_avx512::kTable);
  } else {
    std::printf("skipped AVX512: not supported by this CPU\n");
  }
#endif
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
