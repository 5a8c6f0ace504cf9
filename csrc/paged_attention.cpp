// Torch glue of the paged attention kernel: checks (shapes, dtypes, metadata that would read out of
// bounds), dtype dispatch, (query, KV head) pairs in parallel.

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "kernels/paged_attention.h"
#include "ops.h"
#include "parallel.h"

namespace specbeam {
namespace {

constexpr std::initializer_list<at::ScalarType> kAttentionTypes = {at::kFloat, at::kDouble, at::kBFloat16,
                                                                   at::kHalf};

// A view with unit stride along head_dim: the tensor itself, or a contiguous copy.
at::Tensor unit_stride_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_tensors(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache) {
  check_tensor(query, "query", {-1, -1, -1}, kAttentionTypes);
  check_tensor(key_cache, "key_cache", {-1, -1, -1, query.size(2)}, {query.scalar_type()});
  const auto pool = key_cache.sizes();
  check_tensor(value_cache, "value_cache", {pool[0], pool[1], pool[2], pool[3]}, {query.scalar_type()});
  require(pool[1] >= 1 && pool[2] >= 1 && query.size(1) % pool[2] == 0,
          "query heads (", query.size(1), ") must be a multiple of the pool's KV heads (", pool[2], ")");
}

// The metadata may not point outside the query, the tables or the pool (plain loops: a few microseconds,
// as this runs once per layer). Takes contiguous int64 metadata; returns the most new tokens of a sequence.
int64_t check_metadata(const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& starts,
                       int64_t num_queries, int64_t num_blocks, int64_t block_size) {
  const int64_t num_seqs = tables.size(0), width = tables.size(1);
  const int64_t* start = starts.data_ptr<int64_t>();
  require(start[0] == 0 && start[num_seqs] == num_queries,
          "query_start_loc must rise from 0 to the number of queries (", num_queries, ")");
  int64_t max_new = 0;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t num_new = start[seq + 1] - start[seq], seq_len = lens.data_ptr<int64_t>()[seq];
    require(num_new >= 0, "query_start_loc must not decrease");
    require(num_new <= seq_len && seq_len <= width * block_size,
            "seq_lens must lie between each sequence's new tokens and its block table's capacity");
    const int64_t* table = tables.data_ptr<int64_t>() + seq * width;
    for (int64_t block = 0; block * block_size < seq_len; ++block) {
      require(table[block] >= 0 && table[block] < num_blocks,
              "block_tables must hold block ids in [0, ", num_blocks, ") for every position < seq_len");
    }
    max_new = std::max(max_new, num_new);
  }
  return max_new;
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& query,            // [num_queries, num_q_heads, head_dim]
                           const at::Tensor& key_cache,        // [num_blocks, block_size, num_kv_heads, head_dim]
                           const at::Tensor& value_cache,      // [num_blocks, block_size, num_kv_heads, head_dim]
                           const at::Tensor& block_tables,     // [num_seqs, max_blocks_per_seq] int64
                           const at::Tensor& seq_lens,         // [num_seqs] int64, new tokens included
                           const at::Tensor& query_start_loc,  // [num_seqs + 1] int64
                           const std::optional<at::Tensor>& tree_mask,  // [num_queries, >= max_new] bool; none: causal
                           std::optional<double> scale) {      // none: head_dim ** -0.5
  check_tensors(query, key_cache, value_cache);
  const int64_t num_queries = query.size(0), head_dim = query.size(2), kv_heads = key_cache.size(2);
  const int64_t block_size = key_cache.size(1), group = query.size(1) / kv_heads;
  check_tensor(block_tables, "block_tables", {-1, -1}, {at::kLong});
  check_tensor(seq_lens, "seq_lens", {block_tables.size(0)}, {at::kLong});
  check_tensor(query_start_loc, "query_start_loc", {block_tables.size(0) + 1}, {at::kLong});
  const auto tables = block_tables.contiguous(), lens = seq_lens.contiguous(), starts = query_start_loc.contiguous();
  const int64_t max_new = check_metadata(tables, lens, starts, num_queries, key_cache.size(0), block_size);
  if (tree_mask) {
    check_tensor(*tree_mask, "tree_mask", {num_queries, -1}, {at::kBool});
    require(tree_mask->size(1) >= max_new, "tree_mask must have at least ", max_new, " columns");
  }
  const auto mask = tree_mask ? tree_mask->contiguous() : at::Tensor();
  const auto q = unit_stride_last(query), keys = unit_stride_last(key_cache), values = unit_stride_last(value_cache);
  require(keys.strides() == values.strides(), "key_cache and value_cache must share one layout");
  auto out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  const KVLayout kv{keys.stride(0), keys.stride(1), keys.stride(2), block_size};
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t num_seqs = lens.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "specbeam_paged_attention", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const A softmax_scale = static_cast<A>(scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim))));
    // work units: (tile of up to kTileQueries new tokens of one sequence, KV head)
    std::vector<std::pair<int64_t, int64_t>> tiles;  // (sequence, its first token in the tile)
    for (int64_t seq = 0; seq < num_seqs; ++seq) {
      for (int64_t token = 0; token < start[seq + 1] - start[seq]; token += kTileQueries) tiles.emplace_back(seq, token);
    }
    const auto tile_of = [&](int64_t unit) {  // a work unit's tokens
      const auto [seq, token] = tiles[unit / kv_heads];
      const int64_t num_new = start[seq + 1] - start[seq];
      return Tile{tables.data_ptr<int64_t>() + seq * tables.size(1), lens.data_ptr<int64_t>()[seq], num_new, token,
                  std::min(num_new, token + kTileQueries),
                  mask.defined() ? mask.data_ptr<bool>() + start[seq] * mask.size(1) : nullptr,
                  mask.defined() ? mask.size(1) : 0};
    };
    const auto attend_all = [&](auto dim) {
      parallel_for(0, int64_t(tiles.size()) * kv_heads, 1, [&](int64_t begin, int64_t end) {
        AttentionWorkspace<A> ws(kTileQueries * group, head_dim, block_size);
        for (int64_t unit = begin; unit < end; ++unit) {
          if (unit + 1 < end) {  // the next unit's first keys and values start coming
            const Tile next = tile_of(unit + 1);
            prefetch_block(keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), kv, next, (unit + 1) % kv_heads, 0,
                           next.end(next.token_end - 1), head_dim);
          }
          const Tile tile = tile_of(unit);
          const int64_t kv_head = unit % kv_heads, row = start[tiles[unit / kv_heads].first] + tile.token_begin;
          const int64_t first_head = kv_head * group;
          attend_tile<decltype(dim)::value>(
              q.data_ptr<scalar_t>() + row * q.stride(0) + first_head * q.stride(1), q.stride(0), q.stride(1),
              keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), kv, kv_head, tile, group, head_dim,
              softmax_scale, ws, out.data_ptr<scalar_t>() + (row * query.size(1) + first_head) * head_dim,
              query.size(1) * head_dim);
        }
      });
    };
    // the head sizes models use, compiled for; any other is read at run time
    switch (head_dim) {
      case 8: attend_all(std::integral_constant<int64_t, 8>()); break;
      case 16: attend_all(std::integral_constant<int64_t, 16>()); break;
      case 32: attend_all(std::integral_constant<int64_t, 32>()); break;
      case 64: attend_all(std::integral_constant<int64_t, 64>()); break;
      case 128: attend_all(std::integral_constant<int64_t, 128>()); break;
      default: attend_all(std::integral_constant<int64_t, 0>());
    }
  });
  return out;  // [num_queries, num_q_heads, head_dim]
}

}  // namespace specbeam
