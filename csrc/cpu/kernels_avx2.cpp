// The CPU kernels built for the AVX2 capability (compiler flags and CPU_CAPABILITY macros set
// by setup.py and CMakeLists.txt for this file).
#define SK_CAPABILITY_NAMESPACE capability_avx2
#define SK_CAPABILITY_NAME "AVX2"
#include "kernels_impl.h"
