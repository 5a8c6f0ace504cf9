// out = x @ weight.T + bias for a few rows of x, on a weight packed into column panels once, at load time.
// Plain C++ (AVX2 intrinsics where the compiler targets them): no torch headers.
//
// out[i, j] = bias[j] + sum_k x[i, k] * weight[j, k]
//
// Packed weight, N * K elements: N / P panels [K, P], panel p row k holding weight[p * P + c, k] for the
// P = 2 W columns c (W lanes of the sum type in a 256-bit register: P = 16 for float32, 8 for float64), then
// the N % P last columns as one tail [K, N % P]. One step of k is then two vector loads, x[i, k] broadcast
// and two fused multiply-adds per row of x: an outer product, each loaded weight vector serving every row
// (the dot-product form over nn.Linear's layout reloads or reshuffles per row of x).
// A bfloat16 panel row interleaves its 16 columns as 0, 8, 1, 9, ..., 7, 15, so that the 32-bit words of
// one 256-bit load hold column l in their low half and column l + 8 in their high half: a shift up 16 gives
// columns 0..7 as float32, masking the low half gives columns 8..15, both exact.
//
// Batch invariance: each out[i, j] is one chain of fused multiply-adds in increasing k from zero, then + bias.
// Blocking over rows of x or panels, and the thread split over panels, only decide which chains run side by
// side, so out[i, j] is bitwise the same whatever M is, wherever row i sits in x and however many threads
// run. The portable lanes follow the AVX2 ones operation for operation: the same bits. A bfloat16 weight is
// widened exactly, so a float32 weight that bfloat16 holds exactly gives the same bits from half the bytes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace specbeam {

// A bfloat16 element as its bits: the upper half of a float32.
struct BFloat16Bits {
  uint16_t bits;
};

// An element of the weight as the float type of the sums: itself, or a bfloat16 widened exactly.
inline float widen(BFloat16Bits v) {
  const uint32_t bits = uint32_t{v.bits} << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float widen(float v) { return v; }
inline double widen(double v) { return v; }

// W lanes of T: zero, broadcast, fused multiply-add, store; and the two vectors of one panel row.
template <typename T>
struct Lanes {
  static constexpr int W = 32 / sizeof(T);  // one 256-bit register
  T lane[W];
  static Lanes zero() { return Lanes{}; }
  static Lanes broadcast(T v) {
    Lanes out;
    for (int l = 0; l < W; ++l) out.lane[l] = v;
    return out;
  }
  void fma(const Lanes& a, const Lanes& b) {  // this += a * b, rounded once
    for (int l = 0; l < W; ++l) lane[l] = std::fma(a.lane[l], b.lane[l], lane[l]);
  }
  void store(T* p, const T* bias) const {  // p[l] = lane[l] + bias[l]
    for (int l = 0; l < W; ++l) p[l] = bias ? lane[l] + bias[l] : lane[l];
  }
  static void load_row(const T* p, Lanes& low, Lanes& high) {  // columns 0..W-1, W..2W-1
    for (int l = 0; l < W; ++l) low.lane[l] = p[l], high.lane[l] = p[W + l];
  }
  static void load_row(const BFloat16Bits* p, Lanes& low, Lanes& high) {  // interleaved: 2l -> l, 2l+1 -> l+W
    for (int l = 0; l < W; ++l) low.lane[l] = widen(p[2 * l]), high.lane[l] = widen(p[2 * l + 1]);
  }
};

#if defined(__AVX2__) && defined(__FMA__)
template <>
struct Lanes<float> {
  static constexpr int W = 8;
  __m256 v;
  static Lanes zero() { return {_mm256_setzero_ps()}; }
  static Lanes broadcast(float x) { return {_mm256_set1_ps(x)}; }
  void fma(const Lanes& a, const Lanes& b) { v = _mm256_fmadd_ps(a.v, b.v, v); }
  void store(float* p, const float* bias) const {
    _mm256_storeu_ps(p, bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias)) : v);
  }
  static void load_row(const float* p, Lanes& low, Lanes& high) {
    low.v = _mm256_loadu_ps(p);
    high.v = _mm256_loadu_ps(p + 8);
  }
  static void load_row(const BFloat16Bits* p, Lanes& low, Lanes& high) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    low.v = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
    high.v = _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
  }
};

template <>
struct Lanes<double> {
  static constexpr int W = 4;
  __m256d v;
  static Lanes zero() { return {_mm256_setzero_pd()}; }
  static Lanes broadcast(double x) { return {_mm256_set1_pd(x)}; }
  void fma(const Lanes& a, const Lanes& b) { v = _mm256_fmadd_pd(a.v, b.v, v); }
  void store(double* p, const double* bias) const {
    _mm256_storeu_pd(p, bias ? _mm256_add_pd(v, _mm256_loadu_pd(bias)) : v);
  }
  static void load_row(const double* p, Lanes& low, Lanes& high) {
    low.v = _mm256_loadu_pd(p);
    high.v = _mm256_loadu_pd(p + 4);
  }
};
#endif

// Columns per panel for sums in T: two registers.
template <typename T>
constexpr int64_t kPanelColumns = 2 * Lanes<T>::W;

// x [M, K] row-major, the packed weight (elements T, or bfloat16 under T = float), bias [N] or nullptr,
// out [M, N] row-major.
template <typename T, typename WT = T>
struct LinearArgs {
  const T* x;
  const WT* packed;
  const T* bias;
  T* out;
  int64_t M, K, N;
};

// How far ahead in its panel each step of k asks for the weight: the hardware prefetcher alone left the core
// waiting on memory at one row of x.
constexpr int64_t kPrefetchRows = 32;

// out[i0 .. i0 + C, the columns of panels p0 .. p0 + G]: C * G * 2 accumulators, each weight vector loaded
// once per k and multiplied into all C rows.
template <typename T, typename WT, int C, int G>
void linear_tile(const LinearArgs<T, WT>& a, int64_t i0, int64_t p0) {
  using V = Lanes<T>;
  constexpr int64_t P = kPanelColumns<T>;
  V acc[C][G][2];
  for (auto& row : acc) {
    for (auto& pair : row) pair[0] = pair[1] = V::zero();
  }
  const T* x = a.x + i0 * a.K;
  const WT* w = a.packed + p0 * a.K * P;
  for (int64_t k = 0; k < a.K; ++k) {
    for (int g = 0; g < G; ++g) {
      const WT* row = w + (g * a.K + k) * P;
      __builtin_prefetch(row + kPrefetchRows * P, 0, 2);  // may lie past the end: a prefetch never faults
      V low, high;
      V::load_row(row, low, high);
      for (int c = 0; c < C; ++c) {
        const V xs = V::broadcast(x[c * a.K + k]);
        acc[c][g][0].fma(xs, low);
        acc[c][g][1].fma(xs, high);
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int g = 0; g < G; ++g) {
      const int64_t j = (p0 + g) * P;
      T* out = a.out + (i0 + c) * a.N + j;
      acc[c][g][0].store(out, a.bias ? a.bias + j : nullptr);
      acc[c][g][1].store(out + V::W, a.bias ? a.bias + j + V::W : nullptr);
    }
  }
}

// Panels side by side for C rows: at least 8 independent chains in flight (two FMA units, latency 4),
// at most 12 accumulators (16 registers, with a weight pair and a broadcast)
template <int C>
constexpr int kPanelsAbreast = C == 1 ? 4 : C == 2 ? 2 : 1;
constexpr int kRowsPerTile = 6;

// Rows i0 .. i0 + C (C <= kRowsPerTile) over panels p_begin .. p_end.
template <int C, typename T, typename WT>
void linear_rows(const LinearArgs<T, WT>& a, int64_t i0, int64_t count, int64_t p_begin, int64_t p_end) {
  if constexpr (C > 1) {
    if (count < C) return linear_rows<C - 1>(a, i0, count, p_begin, p_end);
  }
  constexpr int G = kPanelsAbreast<C>;
  int64_t p = p_begin;
  for (; p + G <= p_end; p += G) linear_tile<T, WT, C, G>(a, i0, p);
  for (; p < p_end; ++p) linear_tile<T, WT, C, 1>(a, i0, p);
}

// The tail's R = N % P columns, one scalar chain each: the same fused multiply-adds as a vector lane.
template <typename T, typename WT>
void linear_tail(const LinearArgs<T, WT>& a) {
  const int64_t R = a.N % kPanelColumns<T>, j0 = a.N - R;
  const WT* tail = a.packed + j0 * a.K;
  for (int64_t i = 0; i < a.M; ++i) {
    for (int64_t r = 0; r < R; ++r) {
      T sum = 0;
      for (int64_t k = 0; k < a.K; ++k) sum = std::fma(a.x[i * a.K + k], widen(tail[k * R + r]), sum);
      a.out[i * a.N + j0 + r] = a.bias ? sum + a.bias[j0 + r] : sum;
    }
  }
}

// Units of work: the N / P panels, then the tail if there is one.
template <typename T>
int64_t linear_unit_count(int64_t N) {
  return (N + kPanelColumns<T> - 1) / kPanelColumns<T>;
}

// out[:, the columns of units u_begin .. u_end] (every row of x): row tiles innermost, so that a panel read
// from memory serves every tile from the caches.
template <typename T, typename WT>
void linear_units(const LinearArgs<T, WT>& a, int64_t u_begin, int64_t u_end) {
  const int64_t panels = a.N / kPanelColumns<T>;
  if (u_end > panels) linear_tail(a);
  const int64_t p_end = std::min(u_end, panels);
  constexpr int64_t step = std::max(kPanelsAbreast<kRowsPerTile>, 4);
  for (int64_t p = u_begin; p < p_end; p += step) {
    const int64_t p_stop = std::min(p + step, p_end);
    for (int64_t i = 0; i < a.M; i += kRowsPerTile) {
      linear_rows<kRowsPerTile>(a, i, std::min<int64_t>(a.M - i, kRowsPerTile), p, p_stop);
    }
  }
}

}  // namespace specbeam
