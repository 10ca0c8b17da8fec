// The Python extension module sdpax._C: importing it runs the static op registrations; it defines nothing else.
#include <Python.h>

static struct PyModuleDef sdpax_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sdpax_module); }
