// Python bindings of the kvcached core (module kvcached._core).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvcached core: elastic memory regions (host and CUDA backends)";
  m.attr("ABI_VERSION") = 1;
}
