// Inverse-CDF draw over unnormalised weights, shared by sampling and tree verification.
// Plain C++: no torch headers.
#pragma once

#include <cstdint>

namespace specbeam {

// The first index whose cumulative weight exceeds u * total; the last positive one if rounding runs out;
// -1 if no weight is positive. Accumulates in double.
template <typename T>
int64_t inverse_cdf(const T* weights,  // [n] non-negative
                    int64_t n, double u) {
  double total = 0;
  int64_t last_positive = -1;
  for (int64_t i = 0; i < n; ++i) {
    total += static_cast<double>(weights[i]);
    if (weights[i] > T(0)) last_positive = i;
  }
  const double threshold = u * total;
  double running = 0;
  for (int64_t i = 0; i < last_positive; ++i) {
    running += static_cast<double>(weights[i]);
    if (running > threshold) return i;
  }
  return last_positive;
}

}  // namespace specbeam
