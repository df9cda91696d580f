// The dsig operator library. Schemas live beside each op (ops/*.cpp, TORCH_LIBRARY_FRAGMENT);
// kernels in ops/cpu and ops/cuda. Importing dsig_ext._C registers everything.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dsig, m) {}

// An importable module with no Python functions: the ops are reached through torch.ops.dsig.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
