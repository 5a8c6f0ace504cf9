// The torch-facing entry points of specbeam._C, for CPU tensors; bound in bindings.cpp. Each checks its
// inputs first (ValueError / TypeError naming the argument). Semantics: specbeam/reference/.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace specbeam {

// path [batch, width] (-1 padded), num_accepted [batch], next_token [batch]: all int64
using Verified = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor filter_probs(const at::Tensor& logits,       // [batch, vocab] float32 / float64 / bfloat16 / float16
                        const at::Tensor& temperature,  // [batch] float32
                        const at::Tensor& top_k,        // [batch] int64
                        const at::Tensor& top_p,        // [batch] float32
                        const at::Tensor& min_p);       // [batch] float32

at::Tensor sample(const at::Tensor& logits,  // [batch, vocab]
                  const at::Tensor& noise,   // [batch] float32 / float64
                  const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                  const at::Tensor& min_p);  // each [batch], as in filter_probs

Verified greedy_verify(const at::Tensor& parents,        // [batch, width] int64
                       const at::Tensor& num_nodes,      // [batch] int64
                       const at::Tensor& draft_tokens,   // [batch, width] int64
                       const at::Tensor& target_tokens);  // [batch, width] int64

Verified stochastic_verify(const at::Tensor& parents,       // [batch, width] int64
                           const at::Tensor& num_nodes,     // [batch] int64
                           const at::Tensor& draft_tokens,  // [batch, width] int64
                           const at::Tensor& target_probs,  // [batch, width, vocab] float32 / float64
                           const at::Tensor& draft_probs,   // [batch, width, vocab] as target_probs
                           const at::Tensor& uniform,       // [batch, width]
                           const at::Tensor& noise);        // [batch]

at::Tensor paged_attention(const at::Tensor& query,            // [num_queries, num_q_heads, head_dim]
                           const at::Tensor& key_cache,        // [num_blocks, block_size, num_kv_heads, head_dim]
                           const at::Tensor& value_cache,      // [num_blocks, block_size, num_kv_heads, head_dim]
                           const at::Tensor& block_tables,     // [num_seqs, max_blocks_per_seq] int64
                           const at::Tensor& seq_lens,         // [num_seqs] int64
                           const at::Tensor& query_start_loc,  // [num_seqs + 1] int64
                           const std::optional<at::Tensor>& tree_mask,  // [num_queries, >= max_new] bool
                           std::optional<double> scale);

// out [M, N] = x @ weight.T + bias, bitwise the same for a row of x whatever the other rows (kernels/linear.h);
// the weight packed by specbeam.linear_weight.pack, in x's dtype or bfloat16 under float32 x (widened exactly),
// or int8 under float32 x (specbeam.linear_weight.pack_int8: its N float32 column scales, then the panels).
at::Tensor linear(const at::Tensor& x,                      // [M, K] float32 / float64, contiguous
                  const at::Tensor& weight,                 // [N, K] packed, as x or bfloat16; int8: [N, K + 4]
                  const std::optional<at::Tensor>& bias);   // [N] as x

// The int8 columns that an int8 packed weight spends on its column scales: 4 (one float32 a column), else 0
inline int64_t int8_scale_columns(const at::Tensor& packed) { return packed.scalar_type() == at::kChar ? 4 : 0; }

// Llama-family decoder layer halves around attention (semantics: specbeam/reference/decoder.py), float32 or
// float64, each weight packed as `linear` takes it.
// query [T, Hq, D], key and value [T, Hkv, D]
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_inputs(
    const at::Tensor& hidden,       // [T, H]
    const at::Tensor& norm_weight,  // [H]
    double eps,
    const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,  // [Hq * D, H], [Hq * D]
    const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,  // [Hkv * D, H], [Hkv * D]
    const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias,  // [Hkv * D, H], [Hkv * D]
    const at::Tensor& cos, const at::Tensor& sin,                         // [T, D]
    int64_t head_dim);

at::Tensor mlp_block(const at::Tensor& hidden,     // [T, H]: the layer's input
                     const at::Tensor& attention,  // [T, Hq * D]
                     const at::Tensor& o_weight, const std::optional<at::Tensor>& o_bias,  // [H, Hq * D], [H]
                     const at::Tensor& norm_weight,                                        // [H]
                     double eps,
                     const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,  // [I, H], [I]
                     const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,      // [I, H], [I]
                     const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias);  // [H, I], [H]

}  // namespace specbeam
