// Input checks of the torch glue: each raises a Python ValueError or TypeError that names the argument,
// before any work starts.
#pragma once

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace specbeam {

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  if (!t.device().is_cpu()) throw pybind11::value_error(message(name, " must be a CPU tensor, got ", t.device()));
}

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (at::ScalarType dtype : allowed) {
    if (t.scalar_type() == dtype) return;
  }
  std::ostringstream list;
  for (at::ScalarType dtype : allowed) list << dtype << " ";
  throw pybind11::type_error(message(name, " must be one of [ ", list.str(), "], got ", t.scalar_type()));
}

// A CPU tensor of one of `allowed` dtypes with the given sizes (-1: any).
inline void check_tensor(const at::Tensor& t, const char* name, std::initializer_list<int64_t> sizes,
                         std::initializer_list<at::ScalarType> allowed) {
  check_cpu(t, name);
  check_dtype(t, name, allowed);
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  for (int64_t dim = 0; ok && dim < t.dim(); ++dim) ok = sizes.begin()[dim] < 0 || t.size(dim) == sizes.begin()[dim];
  if (!ok) {
    std::ostringstream want;
    for (int64_t size : sizes) want << (size < 0 ? std::string("*") : std::to_string(size)) << " ";
    throw pybind11::value_error(message(name, " must have shape [ ", want.str(), "], got ", t.sizes()));
  }
}

// The message's parts are put together only when the check fails: a check inside a loop costs a comparison.
template <typename... Parts>
void require(bool ok, const Parts&... parts) {
  if (!ok) throw pybind11::value_error(message(parts...));
}

}  // namespace specbeam
