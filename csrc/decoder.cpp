// The two halves of a Llama-family decoder layer around its attention, one call each instead of some twenty
// Python-level ops. The same ATen ops, in the same order, as specbeam/reference/decoder.py: the same bits.
#include <ATen/ATen.h>

#include "checks.h"
#include "ops.h"

namespace specbeam {
namespace {

// y = x W^T + b: the batch-invariant kernel where it applies (float32 / float64, or a bfloat16 weight under
// float32 x, widened exactly), else ATen's
at::Tensor dense(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (linear_takes(x.scalar_type(), weight.scalar_type())) {
    return specbeam::linear(x.contiguous(), weight.contiguous(), bias);
  }
  return at::linear(x, weight, bias);
}

// w * (x / sqrt(mean(x^2) + eps)), the statistics in float32
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * h.to(x.scalar_type());
}

// x * cos + rotate_half(x) * sin, rotate_half(x1, x2) = (-x2, x1); x [T, H, D], cos / sin [T, 1, D]
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  return x * cos + at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1) * sin;
}

void check_layer_input(const at::Tensor& hidden, const at::Tensor& weight, const char* weight_name) {
  check_tensor(hidden, "hidden", {-1, -1}, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_cpu(weight, weight_name);
  require(weight.dim() == 2 && weight.size(1) == hidden.size(1),
          message(weight_name, " must have shape [*, ", hidden.size(1), "], got ", weight.sizes()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_inputs(
    const at::Tensor& hidden, const at::Tensor& norm_weight, double eps, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
    const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias, const at::Tensor& cos,
    const at::Tensor& sin, int64_t head_dim) {
  check_layer_input(hidden, q_weight, "q_weight");
  const int64_t tokens = hidden.size(0);
  require(cos.dim() == 2 && cos.size(0) == tokens && cos.size(1) == head_dim && sin.sizes() == cos.sizes(),
          message("cos and sin must have shape [", tokens, ", ", head_dim, "], got ", cos.sizes(), " and ",
                  sin.sizes()));
  const at::Tensor x = rms_norm(hidden, norm_weight, eps);
  const at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  at::Tensor query = dense(x, q_weight, q_bias).view({tokens, -1, head_dim});
  at::Tensor key = dense(x, k_weight, k_bias).view({tokens, -1, head_dim});
  at::Tensor value = dense(x, v_weight, v_bias).view({tokens, -1, head_dim});
  return {rope(query, c, s), rope(key, c, s), value};
}

at::Tensor mlp_block(const at::Tensor& hidden, const at::Tensor& attention, const at::Tensor& o_weight,
                     const std::optional<at::Tensor>& o_bias, const at::Tensor& norm_weight, double eps,
                     const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
                     const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                     const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias) {
  check_layer_input(attention, o_weight, "o_weight");
  check_layer_input(hidden, gate_weight, "gate_weight");
  const at::Tensor h = hidden + dense(attention, o_weight, o_bias);
  const at::Tensor x = rms_norm(h, norm_weight, eps);
  return h + dense(at::silu(dense(x, gate_weight, gate_bias)) * dense(x, up_weight, up_bias), down_weight,
                   down_bias);
}

}  // namespace specbeam
