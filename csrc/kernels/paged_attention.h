// Attention of a few new tokens of one sequence, their query heads that share a KV head, over a paged KV
// cache, with an online softmax walked block by block through the block table. Layout and visibility:
// specbeam/reference/paged_attention.py. Plain C++: no torch headers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fast_exp.h"

namespace specbeam {

// A pool [num_blocks, block_size, num_kv_heads, head_dim] with unit stride along head_dim (strides in elements).
struct KVLayout {
  int64_t block_stride, slot_stride, head_stride;
  int64_t block_size;
};

// A tile: up to kTileQueries new tokens of one sequence, each with the `group` query heads that share one KV
// head. The tile walks the blocks of keys once (a draft tree's tokens share their keys); each query vector
// scores a block and weighs its values on its own, the same operations whatever else the tile holds: a token's
// output does not depend on the tokens beside it.
constexpr int64_t kTileQueries = 16;
constexpr int64_t kLanes = 16;  // partial sums of a score over d; values weighed a vector at a time
constexpr int64_t kChains = 4;  // independent partial sums of the weights over keys, so that no long chain of
                                // dependent adds waits

// kLanes values of the accumulator type as one GCC / Clang vector: an operation on it is one per lane
template <typename A>
struct LanesOf;
template <>
struct LanesOf<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LanesOf<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};

// Per-thread buffers for a tile of `rows` query vectors (tokens x group) of `head_dim`, a block of keys at a
// time (accumulator type A); `width`: a block's scores per query vector.
template <typename A>
struct AttentionWorkspace {
  int64_t width;
  std::vector<A> query, acc, scores, running_max, running_sum;
  std::vector<int64_t> end;  // per query vector: the keys [0, end) it may see
  AttentionWorkspace(int64_t rows, int64_t head_dim, int64_t block_size)
      : width(block_size), query(rows * head_dim), acc(rows * head_dim), scores(rows * width), running_max(rows),
        running_sum(rows), end(rows) {}
};

// A tile's new tokens: tokens [token_begin, token_end) of one sequence.
struct Tile {
  const int64_t* block_table;  // [max_blocks_per_seq]
  int64_t seq_len;             // keys of the sequence, its new tokens included
  int64_t num_new;             // its new tokens: positions seq_len - num_new ... seq_len - 1
  int64_t token_begin, token_end;
  const bool* mask;            // [num_new, mask_stride] which new tokens each sees; nullptr: causal (c <= token)
  int64_t mask_stride;

  int64_t first_new() const { return seq_len - num_new; }
  // causal: no key past the token; a tree mask may point anywhere among the new tokens
  int64_t end(int64_t token) const { return first_new() + (mask == nullptr ? token + 1 : num_new); }
  bool visible(int64_t token, int64_t pos) const {
    return pos < first_new() || mask == nullptr || mask[token * mask_stride + pos - first_new()];
  }
};

// kLanes values from x as accumulator lanes (converted, where the pool holds another type)
template <typename A, typename S>
typename LanesOf<A>::type load_lanes(const S* x) {
  typename LanesOf<A>::type lanes;
  if constexpr (std::is_same_v<S, A>) {
    std::memcpy(&lanes, x, sizeof lanes);
  } else {
    A wide[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) wide[l] = static_cast<A>(x[l]);
    std::memcpy(&lanes, wide, sizeof lanes);
  }
  return lanes;
}

// The lanes' sum, added pairwise by halving: lane l + half into lane l, for half = kLanes / 2, ..., 1.
template <typename A>
A halving_sum(typename LanesOf<A>::type lanes) {
  static_assert(kLanes == 16, "four halvings");
  typedef A Half __attribute__((vector_size(kLanes / 2 * sizeof(A))));
  typedef A Quarter __attribute__((vector_size(kLanes / 4 * sizeof(A))));
  typedef A Eighth __attribute__((vector_size(kLanes / 8 * sizeof(A))));
  const auto halves = [](const auto& whole, auto half) {  // its low half + its high half
    decltype(half) high;
    std::memcpy(&half, &whole, sizeof half);
    std::memcpy(&high, reinterpret_cast<const char*>(&whole) + sizeof half, sizeof high);
    return half + high;
  };
  const Eighth two = halves(halves(halves(lanes, Half{}), Quarter{}), Eighth{});
  return two[0] + two[1];
}

// Lane j: halving_sum(parts[j]), for all kLanes parts at once where the compiler can shuffle vectors (GCC 12+,
// Clang): each level adds the halves of two vectors' partial sums side by side, the same additions.
template <typename A>
typename LanesOf<A>::type halving_sums(const typename LanesOf<A>::type (&parts)[kLanes]) {
  typename LanesOf<A>::type sums;
#if defined(__clang__) || __GNUC__ >= 12
  typename LanesOf<A>::type eights[8], fours[4], twos[2];
  for (int a = 0; a < 8; ++a) {  // parts 2a and 2a + 1, each halved to 8 lanes, side by side
    const auto &x = parts[2 * a], &y = parts[2 * a + 1];
    eights[a] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int b = 0; b < 4; ++b) {  // parts 4b .. 4b + 3, each halved to 4 lanes
    const auto &x = eights[2 * b], &y = eights[2 * b + 1];
    fours[b] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int c = 0; c < 2; ++c) {  // parts 8c .. 8c + 7, each halved to 2 lanes
    const auto &x = fours[2 * c], &y = fours[2 * c + 1];
    twos[c] = __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
              __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  sums = __builtin_shufflevector(twos[0], twos[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(twos[0], twos[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  for (int64_t j = 0; j < kLanes; ++j) sums[j] = halving_sum<A>(parts[j]);
#endif
  return sums;
}

// out[j] = scale * q . k_j for `count` <= kLanes consecutive key rows (unit stride along d) and one query vector:
// the sum over d runs as kLanes partial sums (d mod kLanes), each in order of d, then `halving_sum`. Every query
// and key goes through the same operations, whatever else the tile holds. kDim: head_dim when known at compile
// time (the loops unroll), or 0.
template <int64_t kDim, typename S, typename A>
void scaled_dots(const A* q, const S* keys, int64_t slot_stride, int64_t count, int64_t head_dim, A scale, A* out) {
  using Lanes = typename LanesOf<A>::type;
  const int64_t size = kDim ? kDim : head_dim;
  Lanes parts[kLanes] = {};
  for (int64_t j = 0; j < count; ++j) {
    const S* k = keys + j * slot_stride;
#if defined(__clang__) || __GNUC__ >= 12
    if constexpr (kDim == kLanes / 2 && std::is_same_v<S, A>) {  // one half-width product, widened with zeros
      typedef A Half __attribute__((vector_size(kLanes / 2 * sizeof(A))));
      Half q_half, k_half;
      std::memcpy(&q_half, q, sizeof q_half);
      std::memcpy(&k_half, k, sizeof k_half);
      parts[j] = __builtin_shufflevector(q_half * k_half, Half{}, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      continue;
    }
#endif
    int64_t d = 0;
    for (; d + kLanes <= size; d += kLanes) parts[j] += load_lanes<A>(q + d) * load_lanes<A>(k + d);
    for (int64_t l = 0; d + l < size; ++l) parts[j][l] += q[d + l] * static_cast<A>(k[d + l]);
  }
  const Lanes dots = halving_sums<A>(parts) * scale;
  std::memcpy(out, &dots, count * sizeof(A));
}

// Scores of every query vector against the keys [start, stop) of one block, each key row read where it lies;
// -inf where a query may not see. Query vectors t * group ... t * group + group - 1 are token token_begin + t's
// heads.
template <int64_t kDim, typename S, typename A>
void block_scores(const S* keys, int64_t slot_stride, const Tile& tile, int64_t start, int64_t stop, int64_t rows,
                  int64_t group, int64_t head_dim, A scale, AttentionWorkspace<A>& ws) {
  for (int64_t t = 0, i = 0; i < rows; ++t, i += group) {
    const int64_t count = std::min(stop, ws.end[i]) - start;
    for (int64_t g = i; g < i + group; ++g) {
      for (int64_t first = 0; first < count; first += kLanes) {
        scaled_dots<kDim>(&ws.query[g * head_dim], keys + first * slot_stride, slot_stride,
                          std::min(kLanes, count - first), head_dim, scale, &ws.scores[g * ws.width + first]);
      }
    }
    if (tile.mask == nullptr) continue;  // causal: every key before the token's end is visible
    for (int64_t j = std::max<int64_t>(0, tile.first_new() - start); j < count; ++j) {  // (the cached keys are)
      if (tile.visible(tile.token_begin + t, start + j)) continue;
      for (int64_t g = i; g < i + group; ++g) ws.scores[g * ws.width + j] = -std::numeric_limits<A>::infinity();
    }
  }
}

// acc = acc * rescale + sum_j w_j v_j over the block's first `count` values, j in order.
template <int64_t kDim, typename S, typename A>
void weigh_values(const S* values, int64_t slot_stride, const A* w, int64_t count, A rescale, int64_t head_dim,
                  A* acc) {
  const int64_t size = kDim ? kDim : head_dim;
  if constexpr (kDim > 0 && kDim % kLanes == 0 && std::is_same_v<S, A>) {  // the accumulator in registers
    using Lanes = typename LanesOf<A>::type;
    Lanes sums[kDim / kLanes];
    std::memcpy(sums, acc, sizeof sums);
    for (auto& part : sums) part *= rescale;
    for (int64_t j = 0; j < count; ++j) {
      for (int64_t c = 0; c < kDim / kLanes; ++c) {
        Lanes v;
        std::memcpy(&v, values + j * slot_stride + c * kLanes, sizeof v);
        sums[c] += w[j] * v;
      }
    }
    std::memcpy(acc, sums, sizeof sums);
    return;
  }
  for (int64_t d = 0; d < size; ++d) acc[d] *= rescale;
  for (int64_t j = 0; j < count; ++j) {
    const S* v = values + j * slot_stride;
#pragma omp simd
    for (int64_t d = 0; d < size; ++d) acc[d] += w[j] * static_cast<A>(v[d]);
  }
}

// Online softmax over one block, per query vector i (its keys [start, min(stop, end_i))):
// m' = max(m, max_j s_j); l' = l e^(m - m') + sum_j e^(s_j - m'); acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j.
// Each vector's operations are the same whatever else the tile holds.
template <int64_t kDim, typename S, typename A>
void accumulate_block(const S* values, int64_t slot_stride, int64_t start, int64_t stop, int64_t rows,
                      int64_t head_dim, AttentionWorkspace<A>& ws) {
  constexpr A kNone = -std::numeric_limits<A>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t count = std::min(stop, ws.end[i]) - start;
    if (count <= 0) continue;
    A* s = &ws.scores[i * ws.width];
    A new_max = ws.running_max[i];
#pragma omp simd reduction(max : new_max)
    for (int64_t j = 0; j < count; ++j) new_max = std::max(new_max, s[j]);
    if (new_max == kNone) continue;  // nothing visible yet
    const A rescale = fast_exp(ws.running_max[i] - new_max);  // 0 before the first visible key
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) s[j] = fast_exp(s[j] - new_max);  // the weights, in place
    // their sum in kChains partial sums (j mod kChains), added pairwise: no chain of `count` dependent adds
    A part[kChains] = {};
    for (int64_t j = 0; j < count; ++j) part[j % kChains] += s[j];
    ws.running_sum[i] = ws.running_sum[i] * rescale + ((part[0] + part[1]) + (part[2] + part[3]));
    ws.running_max[i] = new_max;
    weigh_values<kDim>(values, slot_stride, s, count, rescale, head_dim, &ws.acc[i * head_dim]);
  }
}

// Ask for the key and value rows of positions [start, min(start + block_size, end)) of one KV head (start: the
// first of a block), so that they come from memory while other work runs: the cache rarely holds a step's K/V,
// whose blocks lie apart.
template <typename S>
void prefetch_block(const S* key_cache, const S* value_cache, const KVLayout& kv, const Tile& tile, int64_t kv_head,
                    int64_t start, int64_t end, int64_t head_dim) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(S));  // elements per cache line
  const int64_t offset = tile.block_table[start / kv.block_size] * kv.block_stride + kv_head * kv.head_stride;
  for (int64_t j = 0; j < std::min(kv.block_size, end - start); ++j) {
    for (int64_t d = 0; d < head_dim; d += kLine) {
      __builtin_prefetch(key_cache + offset + j * kv.slot_stride + d);
      __builtin_prefetch(value_cache + offset + j * kv.slot_stride + d);
    }
  }
}

// out[t, g] = softmax(scale * q[t, g] . K^T over the keys token t sees) V, for the tile's tokens t and the
// `group` heads g sharing kv_head.
template <int64_t kDim, typename S, typename A>
void attend_tile(const S* query, int64_t query_token_stride, int64_t query_head_stride,  // [tokens, group, D]
                 const S* key_cache, const S* value_cache, const KVLayout& kv, int64_t kv_head, const Tile& tile,
                 int64_t group, int64_t head_dim, A scale, AttentionWorkspace<A>& ws,
                 S* out, int64_t out_token_stride) {  // [tokens, group, head_dim]
  const int64_t rows = (tile.token_end - tile.token_begin) * group;
  int64_t last = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const S* q = query + (i / group) * query_token_stride + (i % group) * query_head_stride;
    std::transform(q, q + head_dim, &ws.query[i * head_dim], [](S x) { return static_cast<A>(x); });
    ws.end[i] = tile.end(tile.token_begin + i / group);
    last = std::max(last, ws.end[i]);
  }
  std::fill(ws.acc.begin(), ws.acc.begin() + rows * head_dim, A(0));
  std::fill(ws.running_max.begin(), ws.running_max.begin() + rows, -std::numeric_limits<A>::infinity());
  std::fill(ws.running_sum.begin(), ws.running_sum.begin() + rows, A(0));
  for (int64_t start = 0; start < last; start += kv.block_size) {
    const int64_t stop = std::min(start + kv.block_size, last);
    const int64_t offset = tile.block_table[start / kv.block_size] * kv.block_stride + kv_head * kv.head_stride;
    if (stop < last) prefetch_block(key_cache, value_cache, kv, tile, kv_head, stop, last, head_dim);
    block_scores<kDim>(key_cache + offset, kv.slot_stride, tile, start, stop, rows, group, head_dim, scale, ws);
    accumulate_block<kDim>(value_cache + offset, kv.slot_stride, start, stop, rows, head_dim, ws);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const A sum = ws.running_sum[i];
    const A* acc = &ws.acc[i * head_dim];
    S* o = out + (i / group) * out_token_stride + (i % group) * head_dim;
    if (sum > 0) {
      for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<S>(acc[d] / sum);
    } else {
      std::fill(o, o + head_dim, S(0));
    }
  }
}

}  // namespace specbeam
