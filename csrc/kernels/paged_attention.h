// Attention of one new token's query heads that share a KV head, over a paged KV cache, with an online
// softmax walked block by block through the block table. Layout and visibility:
// specbeam/reference/paged_attention.py. Plain C++: no torch headers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fast_exp.h"

namespace specbeam {

// A pool [num_blocks, block_size, num_kv_heads, head_dim] with unit stride along head_dim (strides in elements).
struct KVLayout {
  int64_t block_stride, slot_stride, head_stride;
  int64_t block_size;
};

// One new token of one sequence: which keys it sees.
struct QueryPosition {
  const int64_t* block_table;  // [max_blocks_per_seq]
  int64_t seq_len;             // keys of the sequence, its new tokens included
  int64_t num_new;             // its new tokens: positions seq_len - num_new ... seq_len - 1
  int64_t token;               // this query's index among them
  const bool* mask_row;        // [>= num_new] which new tokens it sees; nullptr: causal (c <= token)
};

// Per-thread buffers for `group` query heads of `head_dim`, `block_size` keys at a time (accumulator type A).
template <typename A>
struct AttentionWorkspace {
  std::vector<A> query, acc, scores, running_max, running_sum;
  AttentionWorkspace(int64_t group, int64_t head_dim, int64_t block_size)
      : query(group * head_dim), acc(group * head_dim), scores(group * block_size),
        running_max(group), running_sum(group) {}
};

// kDim: head_dim when it is known at compile time (the loops below unroll and vectorise whole), or 0: read at
// run time from `n`.
template <int64_t kDim, typename A, typename S>
A dot(const A* q, const S* k, int64_t n) {
  const int64_t size = kDim ? kDim : n;
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < size; ++d) sum += q[d] * static_cast<A>(k[d]);
  return sum;
}

// acc += w * v
template <int64_t kDim, typename A, typename S>
void axpy(A* acc, A w, const S* v, int64_t n) {
  const int64_t size = kDim ? kDim : n;
#pragma omp simd
  for (int64_t d = 0; d < size; ++d) acc[d] += w * static_cast<A>(v[d]);
}

// Scores of every head against the keys [start, stop) of one block; -inf where the query may not see.
template <int64_t kDim, typename S, typename A>
void block_scores(const S* keys, const KVLayout& kv, const QueryPosition& place, int64_t start, int64_t stop,
                  int64_t group, int64_t head_dim, A scale, AttentionWorkspace<A>& ws) {
  const int64_t first_new = place.seq_len - place.num_new;
  for (int64_t pos = start; pos < stop; ++pos) {
    const bool visible = pos < first_new || place.mask_row == nullptr || place.mask_row[pos - first_new];
    const S* key = keys + (pos - start) * kv.slot_stride;
    for (int64_t g = 0; g < group; ++g) {
      ws.scores[g * kv.block_size + pos - start] = visible
          ? dot<kDim>(&ws.query[g * head_dim], key, head_dim) * scale
          : -std::numeric_limits<A>::infinity();
    }
  }
}

// Online softmax, one block: m' = max(m, max_j s_j); l' = l e^(m - m') + sum_j e^(s_j - m');
// acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j.
template <int64_t kDim, typename S, typename A>
void accumulate_block(const S* values, const KVLayout& kv, int64_t count, int64_t group, int64_t head_dim,
                      AttentionWorkspace<A>& ws) {
  for (int64_t g = 0; g < group; ++g) {
    A* s = &ws.scores[g * kv.block_size];
    const A block_max = *std::max_element(s, s + count);
    const A new_max = std::max(ws.running_max[g], block_max);
    if (new_max == -std::numeric_limits<A>::infinity()) continue;  // nothing visible yet
    const A rescale = fast_exp(ws.running_max[g] - new_max);  // 0 before the first visible key
    A* acc = &ws.acc[g * head_dim];
    for (int64_t d = 0; d < head_dim; ++d) acc[d] *= rescale;
    ws.running_sum[g] *= rescale;
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) s[j] = fast_exp(s[j] - new_max);  // the weights, in place
    for (int64_t j = 0; j < count; ++j) {
      ws.running_sum[g] += s[j];
      axpy<kDim>(acc, s[j], values + j * kv.slot_stride, head_dim);
    }
    ws.running_max[g] = new_max;
  }
}

// out[g] = softmax(scale * q[g] . K^T over the visible keys) V, for the `group` heads sharing kv_head.
template <int64_t kDim, typename S, typename A>
void attend_query(const S* query, int64_t query_head_stride,  // [group, head_dim]
                  const S* key_cache, const S* value_cache, const KVLayout& kv, int64_t kv_head,
                  const QueryPosition& place, int64_t group, int64_t head_dim, A scale, AttentionWorkspace<A>& ws,
                  S* out, int64_t out_head_stride) {  // [group, head_dim]
  for (int64_t g = 0; g < group; ++g) {
    const S* q = query + g * query_head_stride;
    std::transform(q, q + head_dim, &ws.query[g * head_dim], [](S x) { return static_cast<A>(x); });
  }
  std::fill(ws.acc.begin(), ws.acc.end(), A(0));
  std::fill(ws.running_max.begin(), ws.running_max.end(), -std::numeric_limits<A>::infinity());
  std::fill(ws.running_sum.begin(), ws.running_sum.end(), A(0));
  // causal: no key past this token; a tree mask may point anywhere among the new tokens
  const int64_t end = place.seq_len - place.num_new + (place.mask_row == nullptr ? place.token + 1 : place.num_new);
  for (int64_t start = 0; start < end; start += kv.block_size) {
    const int64_t stop = std::min(start + kv.block_size, end);
    const int64_t offset = place.block_table[start / kv.block_size] * kv.block_stride + kv_head * kv.head_stride;
    block_scores<kDim>(key_cache + offset, kv, place, start, stop, group, head_dim, scale, ws);
    accumulate_block<kDim>(value_cache + offset, kv, stop - start, group, head_dim, ws);
  }
  for (int64_t g = 0; g < group; ++g) {
    const A sum = ws.running_sum[g];
    for (int64_t d = 0; d < head_dim; ++d) {
      out[g * out_head_stride + d] = static_cast<S>(sum > 0 ? ws.acc[g * head_dim + d] / sum : A(0));
    }
  }
}

}  // namespace specbeam
