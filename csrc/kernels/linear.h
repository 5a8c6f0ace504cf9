// out = x @ weight.T + bias for a few rows of x, reading each weight row once for all of them.
// Plain C++ (AVX2 intrinsics where the compiler targets them): no torch headers.
//
// out[i, j] = bias[j] + sum_k x[i, k] * weight[j, k]
//
// Batch invariance: the sum of one (i, j) is always taken in the same order. Lane l of a W-wide
// accumulator adds x[i, k] * weight[j, k] for k = l, l + W, l + 2W, ... below K rounded down to W, one
// fused multiply-add each, in increasing k; the W lanes are then summed by a fixed halving tree; the
// leftover k are added one fused multiply-add at a time, in increasing k; the bias comes last. Blocking
// over rows of x or of the weight only decides which sums run side by side, never the order within one,
// so out[i, j] is bitwise the same whatever M is, wherever row i sits in x and however threads split the
// rows of the weight. The portable lanes follow the AVX2 ones operation for operation: same bits.
//
// The weight may also be bfloat16 under float32 x: each element is widened to float32 exactly (its bits
// shifted up 16) as it is loaded, then the same fused multiply-adds run. A float32 weight that bfloat16
// holds exactly therefore gives the same bits from its bfloat16 copy, reading half the bytes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace specbeam {

// A bfloat16 element as its bits: the upper half of a float32.
struct BFloat16Bits {
  uint16_t bits;
};

// An element of the weight as the float type of the sums: itself, or a bfloat16 widened exactly.
inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(BFloat16Bits v) {
  const uint32_t bits = uint32_t{v.bits} << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// W lanes of T: zero, load (unaligned), fused multiply-add, sum of the lanes by a halving tree.
template <typename T>
struct Lanes {
  static constexpr int W = 32 / sizeof(T);  // one 256-bit register
  T lane[W];
  static Lanes zero() { return Lanes{}; }
  template <typename E>  // E: T, or a narrower type widened exactly to T
  static Lanes load(const E* p) {
    Lanes v;
    for (int l = 0; l < W; ++l) v.lane[l] = widen(p[l]);
    return v;
  }
  void fma(const Lanes& a, const Lanes& b) {  // this += a * b, rounded once
    for (int l = 0; l < W; ++l) lane[l] = std::fma(a.lane[l], b.lane[l], lane[l]);
  }
  T sum() const {  // lane[l] += lane[l + half] for half = W/2, W/4, ..., 1
    Lanes v = *this;
    for (int half = W / 2; half >= 1; half /= 2) {
      for (int l = 0; l < half; ++l) v.lane[l] += v.lane[l + half];
    }
    return v.lane[0];
  }
};

#if defined(__AVX2__) && defined(__FMA__)
// A loaded vector kept in a register: left alone, GCC folds the load into every FMA that uses it and
// reloads it from L1 each time, which halves the speed of linear_block.
template <typename V>
V pinned(V v) {
  __asm__("" : "+x"(v));
  return v;
}

template <>
struct Lanes<float> {
  static constexpr int W = 8;
  __m256 v;
  static Lanes zero() { return {_mm256_setzero_ps()}; }
  static Lanes load(const float* p) { return {pinned(_mm256_loadu_ps(p))}; }
  static Lanes load(const BFloat16Bits* p) {  // 8 bfloat16 zero-extended to 32 bits, shifted up 16
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {pinned(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)))};
  }
  void fma(const Lanes& a, const Lanes& b) { v = _mm256_fmadd_ps(a.v, b.v, v); }
  float sum() const {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l, l + 4
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));                         // l, l + 2
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));                            // 0 + 1
  }
};

template <>
struct Lanes<double> {
  static constexpr int W = 4;
  __m256d v;
  static Lanes zero() { return {_mm256_setzero_pd()}; }
  static Lanes load(const double* p) { return {pinned(_mm256_loadu_pd(p))}; }
  void fma(const Lanes& a, const Lanes& b) { v = _mm256_fmadd_pd(a.v, b.v, v); }
  double sum() const {
    const __m128d two = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));  // l, l + 2
    return _mm_cvtsd_f64(_mm_add_sd(two, _mm_unpackhi_pd(two, two)));                        // 0 + 1
  }
};
#endif

// A hint to fetch base + byte into the caches. A prefetch never faults: the address may lie past the end.
template <typename T>
void prefetch_hint(const T* base, int64_t byte) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + byte), 0, 2);
}

// Row-major operands: x [M, K], weight [N, K], out [M, N]; bias [N] or nullptr. The weight's elements are
// T, or bfloat16 under T = float.
template <typename T, typename WT = T>
struct LinearArgs {
  const T* x;
  const WT* weight;
  const T* bias;
  T* out;
  int64_t M, K, N;
};

// out[i, j] for the R weight rows j0 ... j0 + R - 1 and the C x rows i0 ... i0 + C - 1: each weight
// vector is loaded once and multiplied into all C rows. Meanwhile the R rows two blocks on are prefetched,
// as the hardware prefetcher alone left the core waiting on memory (1.4x the time at M = 1 and M = 9).
template <typename T, typename WT, int R, int C>
void linear_block(const LinearArgs<T, WT>& a, int64_t j0, int64_t i0) {
  using V = Lanes<T>;
  const WT* w = a.weight + j0 * a.K;
  const T* x = a.x + i0 * a.K;
  V acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  }
  const int64_t vector_end = a.K / V::W * V::W;
  for (int64_t k = 0; k < vector_end; k += V::W) {
    V xs[C];
    for (int c = 0; c < C; ++c) xs[c] = V::load(x + c * a.K + k);
    for (int64_t byte = 0; byte < R * V::W * int64_t{sizeof(WT)}; byte += 64) {
      prefetch_hint(w, (2 * R * a.K + k * R) * int64_t{sizeof(WT)} + byte);
    }
    for (int r = 0; r < R; ++r) {
      const V wv = V::load(w + r * a.K + k);
      for (int c = 0; c < C; ++c) acc[r][c].fma(xs[c], wv);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      T sum = acc[r][c].sum();
      for (int64_t k = vector_end; k < a.K; ++k) sum = std::fma(x[c * a.K + k], widen(w[r * a.K + k]), sum);
      if (a.bias != nullptr) sum += a.bias[j0 + r];
      a.out[(i0 + c) * a.N + j0 + r] = sum;
    }
  }
}

constexpr int kWeightRows = 4;  // weight rows per block
constexpr int kXRows = 3;       // x rows per block, at most: 12 accumulators + 3 x + 1 weight = 16 registers

// One block of R weight rows from j0 and count <= C x rows from i0.
template <int R, int C = kXRows, typename T, typename WT>
void linear_block_of(const LinearArgs<T, WT>& a, int64_t j0, int64_t i0, int64_t count) {
  if constexpr (C > 1) {
    if (count < C) return linear_block_of<R, C - 1>(a, j0, i0, count);
  }
  linear_block<T, WT, R, C>(a, j0, i0);
}

// Rows of x per pass over the weight rows: as many as fit in about 128 KiB, so they stay in L2 while
// the weight streams through; one pass for the few rows of a decode step or a draft tree.
template <typename T>
int64_t x_tile_rows(int64_t K) {
  const int64_t rows = (int64_t{128} << 10) / (std::max<int64_t>(K, 1) * int64_t{sizeof(T)});
  return std::max<int64_t>(rows / kXRows, 1) * kXRows;
}

template <typename T, typename WT>
void linear_columns(const LinearArgs<T, WT>& a, int64_t j_begin, int64_t j_end);

// A narrow weight under more than one block of x rows: each block of weight rows is widened once into a
// buffer that stays in L1 and all x rows run on that, rather than widening it again for every block of x
// rows (1.8x the time at M = 16); unaligned, half its loads straddled two cache lines. The same float32 values meet the same FMAs: the same bits.
template <typename T, typename WT>
void linear_columns_widened(const LinearArgs<T, WT>& a, int64_t j_begin, int64_t j_end) {
  std::vector<T> storage(kWeightRows * a.K + 64 / sizeof(T));  // on a cache line, as torch's tensors are:
  T* rows = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
  for (int64_t j = j_begin; j < j_end; j += kWeightRows) {
    const int64_t count = std::min<int64_t>(j_end - j, kWeightRows);
    const WT* w = a.weight + j * a.K;
    for (int64_t byte = 0; byte < count * a.K * int64_t{sizeof(WT)}; byte += 64) {
      prefetch_hint(w, 2 * kWeightRows * a.K * int64_t{sizeof(WT)} + byte);  // two blocks on, as linear_block
    }
    for (int64_t e = 0; e < count * a.K; ++e) rows[e] = widen(w[e]);
    const LinearArgs<T, T> block{a.x, rows, a.bias ? a.bias + j : nullptr, a.out + j, a.M, a.K, a.N};
    linear_columns(block, 0, count);
  }
}

// out[:, j_begin:j_end] (every row of x).
template <typename T, typename WT>
void linear_columns(const LinearArgs<T, WT>& a, int64_t j_begin, int64_t j_end) {
  if constexpr (!std::is_same_v<T, WT>) {
    if (a.M > kXRows) return linear_columns_widened(a, j_begin, j_end);
  }
  const int64_t tile = x_tile_rows<T>(a.K);
  for (int64_t i_begin = 0; i_begin < a.M; i_begin += tile) {
    const int64_t i_end = std::min(i_begin + tile, a.M);
    for (int64_t j = j_begin; j < j_end; j += kWeightRows) {
      for (int64_t i = i_begin; i < i_end; i += kXRows) {
        const int64_t count = std::min<int64_t>(i_end - i, kXRows);
        if (j_end - j >= kWeightRows) {
          linear_block_of<kWeightRows>(a, j, i, count);
        } else {
          for (int64_t jj = j; jj < j_end; ++jj) linear_block_of<1>(a, jj, i, count);
        }
      }
    }
  }
}

}  // namespace specbeam
