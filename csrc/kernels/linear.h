// out = x @ weight.T + bias for a few rows of x, on a weight packed into column panels once, at load time.
// Plain C++ (AVX-512 or AVX2 intrinsics where the compiler targets them): no torch headers.
//
// out[i, j] = bias[j] + sum_k x[i, k] * weight[j, k]
//
// Packed weight, N * K elements: N / P panels [K, P], panel p row k holding weight[p * P + c, k] for the
// P = 64 / sizeof(T) columns c (16 for float32, 8 for float64: one 512-bit register, or two 256-bit ones), then
// the N % P last columns as one tail [K, N % P]. One step of k is then one panel row loaded, x[i, k]
// broadcast and one fused multiply-add of the row per row of x: an outer product, each loaded weight row
// serving every row of x (the dot-product form over nn.Linear's layout reloads or reshuffles per row of x).
// Tiles of C rows of x by G panels keep C * G panel rows of sums in registers (C up to 12 with AVX-512's 32
// registers, 6 with AVX2's 16); more rows of x pass over the same few panels in turn, from the caches.
// A bfloat16 panel row interleaves its 16 columns as 0, 8, 1, 9, ..., 7, 15, so that the 32-bit words of
// one 256-bit load hold column l in their low half and column l + 8 in their high half: a shift up 16 gives
// columns 0..7 as float32, masking the low half gives columns 8..15, both exact (AVX-512: the load in both
// halves of one register, shifted in lanes 0..7, masked in lanes 8..15).
//
// Batch invariance: each out[i, j] is one chain of fused multiply-adds in increasing k from zero, then + bias.
// Blocking over rows of x or panels, and the thread split over panels, only decide which chains run side by
// side, so out[i, j] is bitwise the same whatever M is, wherever row i sits in x and however many threads
// run. The portable lanes follow the AVX2 and AVX-512 ones operation for operation: the same bits. A bfloat16
// weight is widened exactly, so a float32 weight that bfloat16 holds exactly gives the same bits from half
// the bytes.
//
// An int8 weight (a draft's, quantized per output column: weight[j, k] ~ scale[j] * q[j, k]) is packed like a
// float32 one, 16 columns of int8 per panel row; its sums run over q widened to float32 (exactly), and the
// column's scale multiplies each sum once at the end: out[i, j] = fma(sum_k x[i, k] * q[j, k], scale[j], bias[j]).
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
inline float widen(int8_t v) { return float(v); }
inline float widen(float v) { return v; }
inline double widen(double v) { return v; }

// A column's sum as it is stored: scaled (an int8 weight's column scale, one rounding with the bias, 0 without
// one) and biased; the vector stores do the same operations lane by lane.
template <typename T>
inline T finish(T sum, const T* bias, const T* scale) {
  if (scale) return std::fma(sum, *scale, bias ? *bias : T(0));
  return bias ? sum + *bias : sum;
}

// Columns per panel: 64 bytes of T (16 float32, 8 float64), whatever the vector registers.
template <typename T>
constexpr int64_t kPanelColumns = 64 / sizeof(T);

// One row of a panel, in the float type T of the sums: the P = kPanelColumns<T> columns, one lane each. It is
// a weight row (widened from bfloat16 exactly) or the running sums of one row of x over a panel.
template <typename T>
struct PanelRow {
  static constexpr int P = kPanelColumns<T>;
  using Broadcast = T;  // x[i, k] as fma takes it
  T lane[P];
  static PanelRow zero() { return PanelRow{}; }
  static Broadcast broadcast(T x) { return x; }
  static PanelRow load(const T* p) {
    PanelRow out;
    for (int l = 0; l < P; ++l) out.lane[l] = p[l];
    return out;
  }
  static PanelRow load(const BFloat16Bits* p) {  // interleaved: 2l -> column l, 2l + 1 -> column l + P / 2
    PanelRow out;
    for (int l = 0; l < P / 2; ++l) out.lane[l] = widen(p[2 * l]), out.lane[l + P / 2] = widen(p[2 * l + 1]);
    return out;
  }
  static PanelRow load(const int8_t* p) {
    PanelRow out;
    for (int l = 0; l < P; ++l) out.lane[l] = widen(p[l]);
    return out;
  }
  void fma(Broadcast x, const PanelRow& w) {  // this += x * w, rounded once
    for (int l = 0; l < P; ++l) lane[l] = std::fma(x, w.lane[l], lane[l]);
  }
  void store(T* p, const T* bias, const T* scale) const {  // p[l] = lane[l] (* scale[l]) + bias[l]
    for (int l = 0; l < P; ++l) p[l] = finish(lane[l], bias ? bias + l : nullptr, scale ? scale + l : nullptr);
  }
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kVectorRegisters = 32, kVectorBytes = 64;  // zmm0 .. zmm31, one panel row each

// A bfloat16 panel row's 16 words widened: the 256-bit row in both halves of the register; lanes 0..7 (low
// halves: columns 0..7) shifted up 16, lanes 8..15 (high halves: columns 8..15) with the low half cleared.
inline __m512 widen_panel_row(const BFloat16Bits* p) {
  const __m512i words = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i high = _mm512_and_si512(words, _mm512_set1_epi32(int32_t(0xFFFF0000u)));
  return _mm512_castsi512_ps(_mm512_mask_slli_epi32(high, 0x00FF, words, 16));
}

template <>
struct PanelRow<float> {
  using Broadcast = __m512;
  __m512 v;
  static PanelRow zero() { return {_mm512_setzero_ps()}; }
  static Broadcast broadcast(float x) { return _mm512_set1_ps(x); }
  static PanelRow load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static PanelRow load(const BFloat16Bits* p) { return {widen_panel_row(p)}; }
  static PanelRow load(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
  void fma(Broadcast x, const PanelRow& w) { v = _mm512_fmadd_ps(x, w.v, v); }
  void store(float* p, const float* bias, const float* scale) const {
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    _mm512_storeu_ps(p, scale ? _mm512_fmadd_ps(v, _mm512_loadu_ps(scale), b) : bias ? _mm512_add_ps(v, b) : v);
  }
};

template <>
struct PanelRow<double> {
  using Broadcast = __m512d;
  __m512d v;
  static PanelRow zero() { return {_mm512_setzero_pd()}; }
  static Broadcast broadcast(double x) { return _mm512_set1_pd(x); }
  static PanelRow load(const double* p) { return {_mm512_loadu_pd(p)}; }
  void fma(Broadcast x, const PanelRow& w) { v = _mm512_fmadd_pd(x, w.v, v); }
  void store(double* p, const double* bias, const double*) const {  // no int8 weight under float64 x
    _mm512_storeu_pd(p, bias ? _mm512_add_pd(v, _mm512_loadu_pd(bias)) : v);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kVectorRegisters = 16, kVectorBytes = 32;  // ymm0 .. ymm15, two per panel row

template <>
struct PanelRow<float> {
  using Broadcast = __m256;
  __m256 low, high;  // columns 0..7, 8..15
  static PanelRow zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Broadcast broadcast(float x) { return _mm256_set1_ps(x); }
  static PanelRow load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static PanelRow load(const BFloat16Bits* p) {  // word l: column l in its low half, column l + 8 in its high half
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(words, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(int32_t(0xFFFF0000u))))};
  }
  static PanelRow load(const int8_t* p) {
    const auto half = [](const int8_t* q) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
    };
    return {half(p), half(p + 8)};
  }
  void fma(Broadcast x, const PanelRow& w) {
    low = _mm256_fmadd_ps(x, w.low, low);
    high = _mm256_fmadd_ps(x, w.high, high);
  }
  void store(float* p, const float* bias, const float* scale) const {
    store_half(p, low, bias, scale);
    store_half(p + 8, high, bias ? bias + 8 : nullptr, scale ? scale + 8 : nullptr);
  }
  static void store_half(float* p, __m256 sums, const float* bias, const float* scale) {
    const __m256 b = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    _mm256_storeu_ps(p, scale  ? _mm256_fmadd_ps(sums, _mm256_loadu_ps(scale), b)
                        : bias ? _mm256_add_ps(sums, b)
                               : sums);
  }
};

template <>
struct PanelRow<double> {
  using Broadcast = __m256d;
  __m256d low, high;  // columns 0..3, 4..7
  static PanelRow zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static Broadcast broadcast(double x) { return _mm256_set1_pd(x); }
  static PanelRow load(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
  void fma(Broadcast x, const PanelRow& w) {
    low = _mm256_fmadd_pd(x, w.low, low);
    high = _mm256_fmadd_pd(x, w.high, high);
  }
  void store(double* p, const double* bias, const double*) const {  // no int8 weight under float64 x
    _mm256_storeu_pd(p, bias ? _mm256_add_pd(low, _mm256_loadu_pd(bias)) : low);
    _mm256_storeu_pd(p + 4, bias ? _mm256_add_pd(high, _mm256_loadu_pd(bias + 4)) : high);
  }
};
#else
constexpr int kVectorRegisters = 16, kVectorBytes = 32;  // the portable lanes: tiles sized as for AVX2
#endif

// x [M, K] row-major, the packed weight (elements T, or bfloat16 or int8 under T = float), bias [N] or nullptr,
// out [M, N] row-major, and under an int8 weight its column scales [N] (else nullptr).
template <typename T, typename WT = T>
struct LinearArgs {
  const T* x;
  const WT* packed;
  const T* bias;
  T* out;
  int64_t M, K, N;
  const T* scale = nullptr;
};

// How far ahead in its panel the first tile of a group asks for the weight at each step of k: the hardware
// prefetcher alone left the core waiting on memory at one row of x. 1024 rows (64 KB of float32) on Zen 2, one
// thread, 12 weights of 2816 x 1024: one row of x 7.3 -> 5.8 ms against 64 rows (64 was the best of 16, 32 and 64
// on Zen 5; 256 gave 6.7-7.4 ms).
constexpr int64_t kPrefetchRows = 1024;

// out[i0 .. i0 + C, the columns of panels p0 .. p0 + G]: C * G panel rows of sums, each weight row loaded once
// per k and multiplied into all C rows; each step of k also prefetches the element `ahead` past its weight row.
template <typename T, typename WT, int C, int G>
void linear_tile(const LinearArgs<T, WT>& a, int64_t i0, int64_t p0, int64_t ahead) {
  using R = PanelRow<T>;
  constexpr int64_t P = kPanelColumns<T>;
  R acc[C][G];
  for (auto& row : acc) {
    for (auto& sums : row) sums = R::zero();
  }
  const T* x = a.x + i0 * a.K;
  const WT* w = a.packed + p0 * a.K * P;
  for (int64_t k = 0; k < a.K; ++k) {
    R weight[G];
    for (int g = 0; g < G; ++g) {
      const WT* row = w + (g * a.K + k) * P;
      __builtin_prefetch(row + ahead, 0, 2);  // may lie past the end: a prefetch never faults
      weight[g] = R::load(row);
    }
    for (int c = 0; c < C; ++c) {
      const typename R::Broadcast xs = R::broadcast(x[c * a.K + k]);
      for (int g = 0; g < G; ++g) acc[c][g].fma(xs, weight[g]);
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int g = 0; g < G; ++g) {
      const int64_t j = (p0 + g) * P;
      acc[c][g].store(a.out + (i0 + c) * a.N + j, a.bias ? a.bias + j : nullptr, a.scale ? a.scale + j : nullptr);
    }
  }
}

// Rows per tile, and panels side by side for C rows: (C + 1) * G panel rows (the sums, and the weight rows
// they share) in the registers but one (a broadcast x), at most 4 panels streamed at once (more left one row
// of x waiting on memory); and at least 8 chains of fused multiply-adds in flight (two units of latency 4)
// where that is all a tile can do. AVX-512: 12 rows (12 x 2 panels) ran 12 rows in the time of 8 on one
// thread, where two tiles of 6 took 1.4 times as long; 16 (16 x 1) was slower at 16 and 32 rows.
constexpr int kRowsPerTile = kVectorRegisters == 32 ? 12 : 6;
constexpr int kRegistersPerPanelRow = 64 / kVectorBytes;
constexpr int panels_abreast(int C) {
  return std::min(4, std::max(8 / (C * kRegistersPerPanelRow),
                              (kVectorRegisters - 1) / ((C + 1) * kRegistersPerPanelRow)));
}

// Rows i0 .. i0 + C over panels p .. p_end, G at a time, then the last p_end - p < G together.
template <int C, int G, typename T, typename WT>
void linear_panels(const LinearArgs<T, WT>& a, int64_t i0, int64_t p, int64_t p_end, int64_t ahead) {
  for (; p + G <= p_end; p += G) linear_tile<T, WT, C, G>(a, i0, p, ahead);
  if constexpr (G > 1) {
    if (p < p_end) linear_panels<C, G - 1>(a, i0, p, p_end, ahead);
  }
}

// Rows i0 .. i0 + count (count <= C <= kRowsPerTile) over panels p_begin .. p_end.
template <int C, typename T, typename WT>
void linear_rows(const LinearArgs<T, WT>& a, int64_t i0, int64_t count, int64_t p_begin, int64_t p_end,
                 int64_t ahead) {
  if constexpr (C > 1) {
    if (count < C) return linear_rows<C - 1>(a, i0, count, p_begin, p_end, ahead);
  }
  linear_panels<C, panels_abreast(C)>(a, i0, p_begin, p_end, ahead);
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
      a.out[i * a.N + j0 + r] = finish(sum, a.bias ? a.bias + j0 + r : nullptr, a.scale ? a.scale + j0 + r : nullptr);
    }
  }
}

// Units of work: the N / P panels, then the tail if there is one.
template <typename T>
int64_t linear_unit_count(int64_t N) {
  return (N + kPanelColumns<T> - 1) / kPanelColumns<T>;
}

// out[:, the columns of units u_begin .. u_end] (every row of a chunk of x): tiles of rows + 1 or rows rows,
// innermost over the few panels of one tile's width, so that panels read from memory serve every tile from the
// caches.
// The first tile of a group streams its panels from memory, prefetching kPrefetchRows ahead; the others read
// them from the caches and meanwhile prefetch the next group's panels (the same rows, `step` panels on), so that
// memory is never idle while they compute (Zen 2, one thread, 8 rows of x over 12 weights of 2816 x 1024: 14.2-
// 17.6 -> 11.6-11.8 ms).
// (Blocking k as well, so that every tile passes over a block from L1, was slower: 5-20% at 16 and 32 rows,
// one thread or two.)
template <typename T, typename WT>
void linear_chunk(const LinearArgs<T, WT>& a, int64_t u_begin, int64_t u_end) {
  const int64_t panels = a.N / kPanelColumns<T>;
  if (u_end > panels) linear_tail(a);
  const int64_t p_end = std::min(u_end, panels);
  const int64_t tiles = (a.M + kRowsPerTile - 1) / kRowsPerTile;
  if (tiles == 0) return;
  const int64_t rows = a.M / tiles, extra = a.M % tiles;  // tile t: rows + (t < extra)
  const int64_t step = panels_abreast(rows + (extra > 0));
  for (int64_t p = u_begin; p < p_end; p += step) {
    const int64_t p_stop = std::min(p + step, p_end);
    for (int64_t t = 0, i = 0; t < tiles; i += rows + (t < extra), ++t) {
      const int64_t ahead = (t == 0 ? kPrefetchRows : step * a.K) * kPanelColumns<T>;
      linear_rows<kRowsPerTile>(a, i, rows + (t < extra), p, p_stop, ahead);
    }
  }
}

// Rows of x at a time: a chunk (x [kRowChunk, K]: half a megabyte at K = 1024 in float32) stays in the core's L2
// cache while the units' panels pass over it, where a long x (a prefill's thousands of tokens) would stream from
// memory again for every few panels. Rows are independent: the chunks change no sum.
constexpr int64_t kRowChunk = 128;

template <typename T, typename WT>
void linear_units(const LinearArgs<T, WT>& a, int64_t u_begin, int64_t u_end) {
  for (int64_t i0 = 0; i0 < a.M; i0 += kRowChunk) {
    LinearArgs<T, WT> rows = a;
    rows.x += i0 * a.K;
    rows.out += i0 * a.N;
    rows.M = std::min(kRowChunk, a.M - i0);
    linear_chunk(rows, u_begin, u_end);
  }
}

}  // namespace specbeam
