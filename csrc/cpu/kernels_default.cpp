// The CPU kernels built for the DEFAULT capability (compiler flags and CPU_CAPABILITY macros set
// by setup.py and CMakeLists.txt for this file).
#define SK_CAPABILITY_NAMESPACE capability_default
#define SK_CAPABILITY_NAME "DEFAULT"
#include "kernels_impl.h"
