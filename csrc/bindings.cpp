// Python bindings of fastppo._C. Inputs and outputs are numpy arrays and Python lists; torch
// never enters here, so the build is fast and independent of the installed torch version.
// Every argument is checked here: bad input raises TypeError/ValueError, never crashes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "layout.h"
#include "planning.h"

namespace py = pybind11;

namespace {

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

void check_integer_array(const py::array& a, const std::string& name) {
  const char kind = a.dtype().kind();
  if (kind != 'b' && kind != 'i' && kind != 'u') {
    throw py::type_error(name + " must be a bool or integer array, got dtype " + std::string(py::str(a.dtype())));
  }
}

py::dict layout_dict(const fastppo::UnpadLayout& layout) {
  py::dict out;
  out["indices"] = to_numpy(layout.indices);
  out["cu_seqlens"] = to_numpy(layout.cu_seqlens);
  out["position_ids"] = to_numpy(layout.position_ids);
  out["seqlens"] = to_numpy(layout.seqlens);
  out["max_seqlen"] = layout.max_seqlen;
  return out;
}

template <typename T>
py::dict unpad_typed(const py::array& mask) {
  auto m = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(mask);
  const int64_t rows = m.shape(0), cols = m.shape(1);
  py::array_t<int32_t> seqlens(rows);
  int64_t total = 0, max_seqlen = 0;
  std::string error;
  {
    py::gil_scoped_release release;
    error = fastppo::count_rows(m.data(), rows, cols, seqlens.mutable_data(), total, max_seqlen);
  }
  if (!error.empty()) throw py::value_error(error);
  py::array_t<int64_t> indices(total), position_ids(total);
  py::array_t<int32_t> cu_seqlens(rows + 1);
  {
    py::gil_scoped_release release;
    fastppo::fill_layout(m.data(), rows, cols, seqlens.data(), indices.mutable_data(), position_ids.mutable_data(),
                         cu_seqlens.mutable_data());
  }
  py::dict out;
  out["indices"] = indices;
  out["cu_seqlens"] = cu_seqlens;
  out["position_ids"] = position_ids;
  out["seqlens"] = seqlens;
  out["max_seqlen"] = max_seqlen;
  return out;
}

py::dict unpad_layout(const py::array& mask) {
  check_integer_array(mask, "mask");
  if (mask.ndim() != 2) {
    throw py::value_error("mask must have shape (B, T), got " + std::to_string(mask.ndim()) + " dimensions");
  }
  // 1-byte (bool, int8, uint8), int32 and int64 masks are read in place when contiguous; other
  // integer types are converted to int64 first. int8's −1 reads as 255 and is rejected.
  const char kind = mask.dtype().kind();
  const auto size = mask.itemsize();
  if (size == 1) {
    auto bytes = py::array(py::dtype::of<uint8_t>(), mask.request().shape, mask.request().strides, mask.data(), mask);
    return unpad_typed<uint8_t>(bytes);
  }
  if (size == 4 && kind == 'i') return unpad_typed<int32_t>(mask);
  return unpad_typed<int64_t>(mask);
}

// 1-D integer array or list/tuple of Python ints → token ids; `keep` owns converted copies.
fastppo::TokenSpan token_span(const py::handle& seq, size_t b, std::vector<std::vector<int64_t>>& keep) {
  const std::string name = "sequences[" + std::to_string(b) + "]";
  if (py::isinstance<py::array>(seq)) {
    auto arr = py::reinterpret_borrow<py::array>(seq);
    check_integer_array(arr, name);
    if (arr.ndim() != 1) throw py::value_error(name + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
    if (arr.dtype().is(py::dtype::of<int64_t>()) && (arr.flags() & py::array::c_style)) {
      return {static_cast<const int64_t*>(arr.data()), static_cast<int64_t>(arr.shape(0))};
    }
    auto converted = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
    keep.emplace_back(converted.data(), converted.data() + converted.shape(0));
  } else if (py::isinstance<py::list>(seq) || py::isinstance<py::tuple>(seq)) {
    auto items = py::reinterpret_borrow<py::sequence>(seq);
    std::vector<int64_t> ids;
    ids.reserve(py::len(items));
    for (size_t t = 0; t < ids.capacity(); ++t) {
      PyObject* item = PySequence_Fast_GET_ITEM(items.ptr(), t);  // lists and tuples only
      if (!PyLong_Check(item)) {
        throw py::type_error(name + "[" + std::to_string(t) + "] must be an int, got " +
                             std::string(Py_TYPE(item)->tp_name));
      }
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
      if (overflow) throw py::value_error(name + "[" + std::to_string(t) + "] does not fit in int64");
      ids.push_back(v);
    }
    keep.push_back(std::move(ids));
  } else {
    throw py::type_error(name + " must be a list or tuple of ints or a 1-D integer numpy array, got " +
                         std::string(py::str(py::type::of(seq).attr("__name__"))));
  }
  return {keep.back().data(), static_cast<int64_t>(keep.back().size())};
}

py::dict collate(const py::sequence& sequences, int64_t pad_id, const std::string& side, int64_t max_length,
                 int64_t pad_to_multiple_of, bool return_layout) {
  if (side != "right" && side != "left") throw py::value_error("side must be 'right' or 'left', got '" + side + "'");
  if (max_length < -1 || max_length == 0) {
    throw py::value_error("max_length must be > 0 (or None), got " + std::to_string(max_length));
  }
  if (pad_to_multiple_of < -1 || pad_to_multiple_of == 0) {
    throw py::value_error("pad_to_multiple_of must be > 0 (or None), got " + std::to_string(pad_to_multiple_of));
  }
  const size_t rows = py::len(sequences);
  std::vector<std::vector<int64_t>> keep;
  keep.reserve(rows);  // spans point into it: no reallocation
  std::vector<fastppo::TokenSpan> spans;
  spans.reserve(rows);
  for (size_t b = 0; b < rows; ++b) spans.push_back(token_span(sequences[b], b, keep));

  std::string error;
  const int64_t cols = fastppo::collated_length(spans, max_length, pad_to_multiple_of, error);
  if (cols < 0) throw py::value_error(error);
  int64_t total = 0;
  for (const auto& s : spans) total += s.size;
  if (total > std::numeric_limits<int32_t>::max()) throw py::value_error("sequences hold more than 2^31 - 1 tokens");

  py::array_t<int64_t> input_ids({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});
  py::array_t<int64_t> attention_mask({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});
  fastppo::UnpadLayout layout;
  {
    py::gil_scoped_release release;
    fastppo::collate(spans, cols, pad_id, side == "left", input_ids.mutable_data(), attention_mask.mutable_data(),
                     return_layout ? &layout : nullptr);
  }
  py::dict out;
  out["input_ids"] = input_ids;
  out["attention_mask"] = attention_mask;
  if (return_layout) out["layout"] = layout_dict(layout);
  return out;
}

std::vector<int64_t> lengths_from(const py::array& seqlens) {
  check_integer_array(seqlens, "seqlens");
  if (seqlens.ndim() != 1) {
    throw py::value_error("seqlens must be 1-D, got " + std::to_string(seqlens.ndim()) + " dimensions");
  }
  auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(seqlens);
  return {a.data(), a.data() + a.shape(0)};
}

std::vector<py::array_t<int64_t>> groups_to_numpy(const fastppo::Groups& groups) {
  std::vector<py::array_t<int64_t>> out;
  out.reserve(groups.size());
  for (const auto& g : groups) out.push_back(to_numpy(g));
  return out;
}

std::vector<py::array_t<int64_t>> plan_microbatches(const py::array& seqlens, int64_t max_tokens, int64_t k) {
  const auto lengths = lengths_from(seqlens);
  fastppo::Groups groups;
  std::string error;
  {
    py::gil_scoped_release release;
    error = fastppo::plan_microbatches(lengths, max_tokens, k, groups);
  }
  if (!error.empty()) throw py::value_error(error);
  return groups_to_numpy(groups);
}

std::vector<py::array_t<int64_t>> balanced_partition(const py::array& seqlens, int64_t k, bool equal_size) {
  const auto lengths = lengths_from(seqlens);
  fastppo::Groups groups;
  std::string error;
  {
    py::gil_scoped_release release;
    error = fastppo::balanced_partition(lengths, k, equal_size, groups);
  }
  if (!error.empty()) throw py::value_error(error);
  return groups_to_numpy(groups);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastppo's C++ batch-layout helpers (numpy in, numpy out)";
  m.def("unpad_layout", &unpad_layout, py::arg("mask"),
        "Packed layout of a (B, T) 0/1 mask: dict with indices (N,) int64, cu_seqlens (B+1,) "
        "int32, position_ids (N,) int64, seqlens (B,) int32 and max_seqlen.");
  m.def("collate", &collate, py::arg("sequences"), py::arg("pad_id"), py::arg("side") = "right",
        py::arg("max_length") = -1, py::arg("pad_to_multiple_of") = -1, py::arg("return_layout") = false,
        "Pad token sequences into (B, L) int64 input_ids and attention_mask (and their packed layout).");
  m.def("plan_microbatches", &plan_microbatches, py::arg("seqlens"), py::arg("max_tokens"), py::arg("k") = 1,
        "Group sequence indices into the fewest micro-batches of at most max_tokens tokens, balanced.");
  m.def("balanced_partition", &balanced_partition, py::arg("seqlens"), py::arg("k"), py::arg("equal_size") = true,
        "Karmarkar-Karp partition of sequence indices into k groups with balanced token sums.");
}
