// The CPU kernels built for the AVX2 capability (its compiler flags and CPU_CAPABILITY macros
// are in capabilities.json, read by setup.py and CMakeLists.txt).
#define SK_CAPABILITY_NAMESPACE capability_avx2
#define SK_CAPABILITY_NAME "AVX2"
#include "kernels_impl.h"
