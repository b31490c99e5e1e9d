// Python bindings of fastppo._C. Inputs and outputs are numpy arrays; torch never enters here,
// so the build is fast and independent of the installed torch version.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <vector>

#include "layout.h"

namespace py = pybind11;

namespace {

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

py::dict unpad_layout(const py::array& mask) {
  const char kind = mask.dtype().kind();
  if (kind != 'b' && kind != 'i' && kind != 'u') {
    throw py::type_error("mask must be a bool or integer array, got dtype " +
                         std::string(py::str(mask.dtype())));
  }
  if (mask.ndim() != 2) {
    throw py::value_error("mask must have shape (B, T), got " + std::to_string(mask.ndim()) +
                          " dimensions");
  }
  // One contiguous int64 view (a copy only when the input is another dtype or strided).
  auto m = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(mask);
  const int64_t rows = m.shape(0), cols = m.shape(1);

  fastppo::UnpadLayout layout;
  std::string error;
  {
    py::gil_scoped_release release;
    error = fastppo::unpad_layout(m.data(), rows, cols, layout);
  }
  if (!error.empty()) throw py::value_error(error);

  py::dict out;
  out["indices"] = to_numpy(layout.indices);
  out["cu_seqlens"] = to_numpy(layout.cu_seqlens);
  out["position_ids"] = to_numpy(layout.position_ids);
  out["seqlens"] = to_numpy(layout.seqlens);
  out["max_seqlen"] = layout.max_seqlen;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastppo's C++ batch-layout helpers (numpy in, numpy out)";
  m.def("unpad_layout", &unpad_layout, py::arg("mask"),
        "Packed layout of a (B, T) 0/1 mask: dict with indices (N,) int64, cu_seqlens (B+1,) "
        "int32, position_ids (N,) int64, seqlens (B,) int32 and max_seqlen.");
}
