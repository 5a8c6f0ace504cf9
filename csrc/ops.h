// The torch-facing entry points of specbeam._C (CPU tensors), bound in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace specbeam {

using Verified = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // path, num_accepted, next_token

at::Tensor filter_probs(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                        const at::Tensor& top_p, const at::Tensor& min_p);

at::Tensor sample(const at::Tensor& logits, const at::Tensor& noise, const at::Tensor& temperature,
                  const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p);

Verified greedy_verify(const at::Tensor& parents, const at::Tensor& num_nodes, const at::Tensor& draft_tokens,
                       const at::Tensor& target_tokens);

Verified stochastic_verify(const at::Tensor& parents, const at::Tensor& num_nodes, const at::Tensor& draft_tokens,
                           const at::Tensor& target_probs, const at::Tensor& draft_probs, const at::Tensor& uniform,
                           const at::Tensor& noise);

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, const std::optional<at::Tensor>& tree_mask,
                           std::optional<double> scale);

}  // namespace specbeam
