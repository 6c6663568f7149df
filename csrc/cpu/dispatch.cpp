// Picks the kernel table of the CPU capability ATen runs with (at::get_cpu_capability(),
// which honours ATEN_CPU_CAPABILITY), among those this build compiled.
#include <ATen/Version.h>

#include <string>

#include "kernels.h"

namespace stablekernels::cpu {

const KernelTable& cpu_kernels() {
  static const KernelTable& table = []() -> const KernelTable& {
    const std::string capability = at::get_cpu_capability();
#ifdef SK_HAVE_AVX512
    if (capability == "AVX512") return capability_avx512::kTable;
#endif
#ifdef SK_HAVE_AVX2
    if (capability == "AVX2" || capability == "AVX512") return capability_avx2::kTable;
#endif
    return capability_default::kTable;
  }();
  return table;
}

}  // namespace stablekernels::cpu
