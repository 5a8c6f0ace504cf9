// exp(x) by one polynomial, the same operations on every lane: a loop of it vectorises (std::exp's does not),
// and a vector pass and a scalar one give the same bits, so that a row's result never depends on where a
// vector happens to start. Plain C++: no torch headers.
//
// x = n ln 2 + r with n = round(x / ln 2), |r| <= ln 2 / 2 (ln 2 in two parts, so that r is exact); then
// exp(x) = 2^n exp(r), exp(r) by its Taylor series to r^7 (float: the remainder under 2^-24) or r^13 (double:
// under 2^-53), in Horner form with fused multiply-adds; 2^n written straight into the exponent bits. Below
// the smallest normal result it is 0 (a masked score, -inf, weighs exactly nothing), above ~e^88 (float) or
// e^709 (double) infinity, and NaN stays NaN. Against std::exp: within 2 ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace specbeam {

template <typename T>
struct ExpTraits;

template <>
struct ExpTraits<float> {
  using Bits = int32_t;
  static constexpr int kDegree = 7, kMantissaBits = 23, kBias = 127;
  static constexpr float kLowest = -87.33654f, kHighest = 88.0f;  // ln(FLT_MIN); 2^n stays finite
  static constexpr float kRound = 12582912.0f;                     // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
};

template <>
struct ExpTraits<double> {
  using Bits = int64_t;
  static constexpr int kDegree = 13, kMantissaBits = 52, kBias = 1023;
  static constexpr double kLowest = -708.3964185322641, kHighest = 709.0;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLog2e = 1.4426950408889634, kLn2Hi = 0.693145751953125, kLn2Lo = 1.4286068203094173e-06;
};

// 1 / k!, rounded once
template <typename T>
constexpr T inverse_factorial(int k) {
  double f = 1.0;
  for (int i = 2; i <= k; ++i) f *= i;
  return static_cast<T>(1.0 / f);
}

// sum over k = K .. degree of r^(k - K) / k!, by Horner's rule, unrolled at compile time
template <typename T, int K>
inline T taylor_tail(T r) {
  if constexpr (K == ExpTraits<T>::kDegree) {
    return inverse_factorial<T>(K);
  } else {
    return std::fma(taylor_tail<T, K + 1>(r), r, inverse_factorial<T>(K));
  }
}

template <typename T>
inline T fast_exp(T x) {
  using E = ExpTraits<T>;
  const T clamped = x < E::kLowest ? E::kLowest : x > E::kHighest ? E::kHighest : x;  // (NaN: kept, handled below)
  const T n = std::fma(clamped, E::kLog2e, E::kRound) - E::kRound;
  const T r = std::fma(n, -E::kLn2Lo, std::fma(n, -E::kLn2Hi, clamped));
  const T p = taylor_tail<T, 0>(r);
  const auto bits = static_cast<typename E::Bits>(static_cast<typename E::Bits>(n) + E::kBias) << E::kMantissaBits;
  const T out = p * __builtin_bit_cast(T, bits);
  return x < E::kLowest ? T(0) : x > E::kHighest ? std::numeric_limits<T>::infinity() : x != x ? x : out;
}

}  // namespace specbeam
