// Makes the library importable as the Python module tritllm_ext._C (setup.py's build). Importing
// it runs the TORCH_LIBRARY registrations; the module itself has no Python functions. The CMake
// build makes a plain shared library for torch.ops.load_library and leaves this file out.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
