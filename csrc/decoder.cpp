// The two halves of a Llama-family decoder layer around its attention, one call each: the batch-invariant
// linear kernel on packed weights, and the norms, rotary embedding, activation and residuals as plain loops
// over each token's row (a token's result never depends on the other tokens). Semantics, to float tolerance:
// specbeam/reference/decoder.py, which is transformers' maths op for op.
#include <ATen/ATen.h>

#include <cmath>

#include "checks.h"
#include "kernels/fast_exp.h"
#include "ops.h"
#include "parallel.h"

namespace specbeam {
namespace {

// out[t] = w * T(x[t] / sqrt(mean(x[t]^2) + eps)), the statistics in float32 as transformers takes them. The
// mean is ATen's own reduction, whose summation order a float64 model's output depends on to the last bit
// through the float32 statistics; the rest is one correctly rounded operation at a time, as ATen's.
template <typename T>
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {  // x [tokens, H], weight [H]
  const int64_t tokens = x.size(0), H = x.size(1);
  const at::Tensor variance = x.to(at::kFloat).pow(2).mean(-1);  // [tokens]
  at::Tensor out = at::empty_like(x);
  const T *in = x.data_ptr<T>(), *w = weight.data_ptr<T>();
  const float* var = variance.data_ptr<float>();
  T* y = out.data_ptr<T>();
  for (int64_t t = 0; t < tokens; ++t) {
    const float inverse = 1.0f / std::sqrt(var[t] + static_cast<float>(eps));
    for (int64_t h = 0; h < H; ++h) y[t * H + h] = w[h] * static_cast<T>(static_cast<float>(in[t * H + h]) * inverse);
  }
  return out;
}

// In place, each head of each token: x = x * cos + rotate_half(x) * sin, rotate_half(x1, x2) = (-x2, x1)
template <typename T>
void rope(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t D) {  // x [tokens, heads * D]
  const int64_t tokens = x.size(0), heads = x.size(1) / D, half = D / 2;
  T* v = x.data_ptr<T>();
  const T *c = cos.data_ptr<T>(), *s = sin.data_ptr<T>();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t head = 0; head < heads; ++head) {
      T* row = v + (t * heads + head) * D;
      const T *ct = c + t * D, *st = s + t * D;
      for (int64_t d = 0; d < half; ++d) {
        const T x1 = row[d], x2 = row[d + half];
        row[d] = x1 * ct[d] + -x2 * st[d];
        row[d + half] = x2 * ct[d + half] + x1 * st[d + half];
      }
    }
  }
}

// In place: a += b, elementwise over equal shapes
template <typename T>
void add_into(at::Tensor& a, const at::Tensor& b) {
  T* x = a.data_ptr<T>();
  const T* y = b.data_ptr<T>();
  for (int64_t i = 0; i < a.numel(); ++i) x[i] += y[i];
}

// Elements per thread at least, where an elementwise loop runs in parallel
constexpr int64_t kElementwiseGrain = 8192;

// In place: gate = silu(gate) * up, silu(g) = g / (1 + exp(-g)); in parallel over the elements, exp vectorised
// (kernels/fast_exp.h: the same bits wherever a thread's range starts). The exps are most of a layer's time
// outside its linears: 0.7 ms of a 246M-parameter pass at 8 tokens on one thread, 2.9 ms at 32 (std::exp).
template <typename T>
void swiglu_into(at::Tensor& gate, const at::Tensor& up) {
  T* g = gate.data_ptr<T>();
  const T* u = up.data_ptr<T>();
  parallel_for(0, gate.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) g[i] = g[i] / (T(1) + fast_exp(-g[i])) * u[i];
  });
}

// A weight [rows, cols] (rows -1: any; int8: 4 more columns); its dtype and packing are the linear kernel's to check
void check_weight(const at::Tensor& weight, const char* name, int64_t rows, int64_t cols) {
  check_cpu(weight, name);
  cols += int8_scale_columns(weight);
  require(weight.dim() == 2 && (rows < 0 || weight.size(0) == rows) && weight.size(1) == cols,
          name, " must have shape [", rows < 0 ? std::string("*") : std::to_string(rows), ", ", cols, "], got ",
          weight.sizes());
}

void check_vector(const at::Tensor& v, const char* name, const at::Tensor& hidden) {
  check_tensor(v, name, {hidden.size(1)}, {hidden.scalar_type()});
  require(v.is_contiguous(), name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_inputs(
    const at::Tensor& hidden, const at::Tensor& norm_weight, double eps, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
    const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias, const at::Tensor& cos,
    const at::Tensor& sin, int64_t head_dim) {
  check_tensor(hidden, "hidden", {-1, -1}, {at::kFloat, at::kDouble});
  const int64_t tokens = hidden.size(0), H = hidden.size(1);
  check_weight(q_weight, "q_weight", -1, H);
  check_weight(k_weight, "k_weight", -1, H);
  check_weight(v_weight, "v_weight", k_weight.size(0), H);
  check_vector(norm_weight, "norm_weight", hidden);
  require(head_dim > 0 && head_dim % 2 == 0 && q_weight.size(0) % head_dim == 0 && k_weight.size(0) % head_dim == 0,
          "head_dim must be even and divide the q and k rows, got ", head_dim);
  require(cos.dim() == 2 && cos.size(0) == tokens && cos.size(1) == head_dim && sin.sizes() == cos.sizes(),
          "cos and sin must have shape [", tokens, ", ", head_dim, "], got ", cos.sizes(), " and ", sin.sizes());
  check_dtype(cos, "cos", {hidden.scalar_type()});
  check_dtype(sin, "sin", {hidden.scalar_type()});
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor query, key, value;
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "specbeam_attention_inputs", [&] {
    const at::Tensor x = rms_norm<scalar_t>(hidden.contiguous(), norm_weight, eps);
    query = specbeam::linear(x, q_weight, q_bias);
    key = specbeam::linear(x, k_weight, k_bias);
    value = specbeam::linear(x, v_weight, v_bias);
    rope<scalar_t>(query, c, s, head_dim);
    rope<scalar_t>(key, c, s, head_dim);
  });
  return {query.view({tokens, -1, head_dim}), key.view({tokens, -1, head_dim}), value.view({tokens, -1, head_dim})};
}

at::Tensor mlp_block(const at::Tensor& hidden, const at::Tensor& attention, const at::Tensor& o_weight,
                     const std::optional<at::Tensor>& o_bias, const at::Tensor& norm_weight, double eps,
                     const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
                     const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                     const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias) {
  check_tensor(hidden, "hidden", {-1, -1}, {at::kFloat, at::kDouble});
  const int64_t H = hidden.size(1);
  check_tensor(attention, "attention", {hidden.size(0), -1}, {hidden.scalar_type()});
  check_weight(o_weight, "o_weight", H, attention.size(1));
  check_vector(norm_weight, "norm_weight", hidden);
  check_weight(gate_weight, "gate_weight", -1, H);
  check_weight(up_weight, "up_weight", gate_weight.size(0), H);
  check_weight(down_weight, "down_weight", H, gate_weight.size(0));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "specbeam_mlp_block", [&] {
    at::Tensor h = specbeam::linear(attention.contiguous(), o_weight, o_bias);
    add_into<scalar_t>(h, hidden.contiguous());  // h = hidden + attention Wo^T
    const at::Tensor x = rms_norm<scalar_t>(h, norm_weight, eps);
    at::Tensor gate = specbeam::linear(x, gate_weight, gate_bias);
    swiglu_into<scalar_t>(gate, specbeam::linear(x, up_weight, up_bias));
    out = specbeam::linear(gate, down_weight, down_bias);
    add_into<scalar_t>(out, h);
  });
  return out;  // [T, H]
}

}  // namespace specbeam
