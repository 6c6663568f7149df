// The CPU kernels built for the DEFAULT capability (its compiler flags and CPU_CAPABILITY macros
// are in capabilities.json, read by setup.py and CMakeLists.txt).
#define SK_CAPABILITY_NAMESPACE capability_default
#define SK_CAPABILITY_NAME "DEFAULT"
#include "kernels_impl.h"
