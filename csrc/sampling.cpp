// Torch glue of the sampling kernels: checks, dtype dispatch, rows in parallel.

#include <type_traits>

#include "checks.h"
#include "kernels/sampling.h"
#include "ops.h"
#include "parallel.h"

namespace specbeam {
namespace {

constexpr std::initializer_list<at::ScalarType> kLogitTypes = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};

// Checks logits and the per-row parameters of `specbeam.reference.sampling.sampling_params`.
void check_sampling(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                    const at::Tensor& top_p, const at::Tensor& min_p) {
  check_tensor(logits, "logits", {-1, -1}, kLogitTypes);
  require(logits.size(1) >= 1, "logits must have a vocabulary of at least one token");
  const int64_t batch = logits.size(0);
  check_tensor(temperature, "temperature", {batch}, {at::kFloat});
  check_tensor(top_k, "top_k", {batch}, {at::kLong});
  check_tensor(top_p, "top_p", {batch}, {at::kFloat});
  check_tensor(min_p, "min_p", {batch}, {at::kFloat});
}

// Calls row_fn(row, logits_row, params, workspace) for every row, in parallel; computes in double for
// float64 logits, in float otherwise.
template <typename RowFn>
void for_each_row(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, RowFn row_fn) {
  const auto temp = temperature.contiguous(), k = top_k.contiguous();
  const auto p = top_p.contiguous(), m = min_p.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "specbeam_sampling", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* rows = logits.data_ptr<scalar_t>();
    const int64_t vocab = logits.size(1);
    parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
      thread_local SamplingWorkspace<T> ws;  // its buffers outlive the call: a row's work allocates nothing
      for (int64_t row = begin; row < end; ++row) {
        const SamplingParams<T> params{static_cast<T>(temp.data_ptr<float>()[row]), k.data_ptr<int64_t>()[row],
                                       static_cast<T>(p.data_ptr<float>()[row]),
                                       static_cast<T>(m.data_ptr<float>()[row])};
        row_fn(row, rows + row * vocab, params, ws);
      }
    });
  });
}

}  // namespace

at::Tensor filter_probs(const at::Tensor& logits,       // [batch, vocab]
                        const at::Tensor& temperature,  // [batch] float32; 0: greedy
                        const at::Tensor& top_k,        // [batch] int64; 0: off
                        const at::Tensor& top_p,        // [batch] float32; 1: off
                        const at::Tensor& min_p) {      // [batch] float32; 0: off
  check_sampling(logits, temperature, top_k, top_p, min_p);
  const auto rows = logits.contiguous();
  const auto dtype = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto probs = at::empty(rows.sizes(), rows.options().dtype(dtype));
  const int64_t vocab = rows.size(1);
  for_each_row(rows, temperature, top_k, top_p, min_p, [&](int64_t row, const auto* logits_row, const auto& params,
                                                           auto& ws) {
    using T = std::decay_t<decltype(params.top_p)>;  // the compute type
    filter_row(logits_row, vocab, params, ws, probs.data_ptr<T>() + row * vocab);
  });
  return probs;  // [batch, vocab] float32 (float64 for float64 logits)
}

at::Tensor sample(const at::Tensor& logits,       // [batch, vocab]
                  const at::Tensor& noise,        // [batch] uniform in [0, 1)
                  const at::Tensor& temperature,  // [batch] float32; 0: argmax
                  const at::Tensor& top_k,        // [batch] int64
                  const at::Tensor& top_p,        // [batch] float32
                  const at::Tensor& min_p) {      // [batch] float32
  check_sampling(logits, temperature, top_k, top_p, min_p);
  check_tensor(noise, "noise", {logits.size(0)}, {at::kFloat, at::kDouble});
  const auto rows = logits.contiguous();
  const auto uniform = noise.to(at::kDouble).contiguous();
  auto tokens = at::empty({rows.size(0)}, rows.options().dtype(at::kLong));
  const double* u = uniform.data_ptr<double>();
  for_each_row(rows, temperature, top_k, top_p, min_p, [&](int64_t row, const auto* logits_row, const auto& params,
                                                           auto& ws) {
    tokens.data_ptr<int64_t>()[row] = sample_row(logits_row, rows.size(1), params, u[row], ws);
  });
  return tokens;  // [batch] int64
}

}  // namespace specbeam
