// The Python face of the native library: an empty module named merv_fast._C.
//
// Nothing is exposed through Python's C API. Importing the module only makes the interpreter dlopen this shared
// library, which runs the static TORCH_LIBRARY registrations (ops.cpp and friends); the ops are then called as
// torch.ops.merv_fast.<name>. That keeps the library free of pybind11 and of any libtorch_python dependency.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "merv_fast native ops; they register themselves under torch.ops.merv_fast",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
