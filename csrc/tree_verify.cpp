// Torch glue of the tree verification kernels: checks, dtype dispatch, rows in parallel.

#include "checks.h"
#include "kernels/tree_verify.h"
#include "ops.h"
#include "parallel.h"

namespace specbeam {
namespace {

// parents, num_nodes and draft_tokens describe a batch of trees (shapes and dtypes).
void check_tree(const at::Tensor& parents, const at::Tensor& num_nodes, const at::Tensor& draft_tokens) {
  check_tensor(parents, "parents", {-1, -1}, {at::kLong});
  require(parents.size(1) >= 1, "parents must be [batch, num_nodes] with num_nodes >= 1");
  check_tensor(num_nodes, "num_nodes", {parents.size(0)}, {at::kLong});
  check_tensor(draft_tokens, "draft_tokens", {parents.size(0), parents.size(1)}, {at::kLong});
}

// Empty (path, num_accepted, next_token) for `batch` trees of `width` nodes.
Verified new_outputs(int64_t batch, int64_t width) {
  const auto options = at::TensorOptions().dtype(at::kLong);
  return {at::empty({batch, width}, options), at::empty({batch}, options), at::empty({batch}, options)};
}

// Stores one row's (num_accepted, next_token).
void store(Verified& out, int64_t row, std::pair<int64_t, int64_t> accepted_next) {
  std::get<1>(out).data_ptr<int64_t>()[row] = accepted_next.first;
  std::get<2>(out).data_ptr<int64_t>()[row] = accepted_next.second;
}

}  // namespace

Verified greedy_verify(const at::Tensor& parents,         // [batch, width] int64
                       const at::Tensor& num_nodes,       // [batch] int64
                       const at::Tensor& draft_tokens,    // [batch, width] int64
                       const at::Tensor& target_tokens) {  // [batch, width] int64: target's argmax after each node
  check_tree(parents, num_nodes, draft_tokens);
  check_tensor(target_tokens, "target_tokens", {parents.size(0), parents.size(1)}, {at::kLong});
  const auto par = parents.contiguous(), count = num_nodes.contiguous();
  const auto draft = draft_tokens.contiguous(), target = target_tokens.contiguous();
  const int64_t width = par.size(1);
  Verified out = new_outputs(par.size(0), width);
  parallel_for(0, par.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> depth;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t at_row = row * width;
      store(out, row, greedy_verify_row(par.data_ptr<int64_t>() + at_row, count.data_ptr<int64_t>()[row],
                                        draft.data_ptr<int64_t>() + at_row, target.data_ptr<int64_t>() + at_row,
                                        width, depth, std::get<0>(out).data_ptr<int64_t>() + at_row));
    }
  });
  return out;
}

Verified stochastic_verify(const at::Tensor& parents,       // [batch, width] int64
                           const at::Tensor& num_nodes,     // [batch] int64
                           const at::Tensor& draft_tokens,  // [batch, width] int64
                           const at::Tensor& target_probs,  // [batch, width, vocab] p after each node
                           const at::Tensor& draft_probs,   // [batch, width, vocab] q of each node's children
                           const at::Tensor& uniform,       // [batch, width] in [0, 1): entry c decides on node c
                           const at::Tensor& noise) {       // [batch] in [0, 1): the recovered or bonus draw
  check_tree(parents, num_nodes, draft_tokens);
  const int64_t batch = parents.size(0), width = parents.size(1);
  check_tensor(target_probs, "target_probs", {batch, width, -1}, {at::kFloat, at::kDouble});
  check_tensor(draft_probs, "draft_probs", {batch, width, target_probs.size(2)}, {target_probs.scalar_type()});
  check_tensor(uniform, "uniform", {batch, width}, {at::kFloat, at::kDouble});
  check_tensor(noise, "noise", {batch}, {at::kFloat, at::kDouble});
  const int64_t vocab = target_probs.size(2);
  require(vocab >= 1, "target_probs must have a vocabulary of at least one token");
  const auto real = at::arange(width, parents.options()).unsqueeze(0) < num_nodes.unsqueeze(1);
  require(!(real & ((draft_tokens < 0) | (draft_tokens >= vocab))).any().item<bool>(),
          "draft_tokens of nodes < num_nodes must lie in [0, ", vocab, ")");
  const auto par = parents.contiguous(), count = num_nodes.contiguous(), draft = draft_tokens.contiguous();
  const auto p = target_probs.contiguous(), q = draft_probs.contiguous();
  const auto u = uniform.to(p.scalar_type()).contiguous(), draw = noise.to(at::kDouble).contiguous();
  Verified out = new_outputs(batch, width);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "specbeam_stochastic_verify", [&] {
    parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> residual_p;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t at_row = row * width;
        store(out, row, stochastic_verify_row(
            par.data_ptr<int64_t>() + at_row, count.data_ptr<int64_t>()[row], draft.data_ptr<int64_t>() + at_row,
            p.data_ptr<scalar_t>() + at_row * vocab, q.data_ptr<scalar_t>() + at_row * vocab,
            u.data_ptr<scalar_t>() + at_row, draw.data_ptr<double>()[row], width, vocab, residual_p,
            std::get<0>(out).data_ptr<int64_t>() + at_row));
      }
    });
  });
  return out;
}

}  // namespace specbeam
