// `import stablekernels._C` loads the library (and so registers its ops); the Python module
// it defines is empty. Kept apart so that CMake can build the ops without Python.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
