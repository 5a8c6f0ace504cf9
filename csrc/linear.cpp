// Torch glue of the small-M linear kernel: checks, dtype dispatch, blocks of weight rows in parallel.
#include <ATen/Parallel.h>

#include <algorithm>

#include "checks.h"
#include "kernels/linear.h"
#include "ops.h"

namespace specbeam {
namespace {

// out = x @ weight.T + bias over whole blocks of weight rows per thread; the split cannot change a sum
template <typename T, typename WT>
void run_linear(const at::Tensor& x, const WT* weight, const std::optional<at::Tensor>& bias, int64_t N,
                at::Tensor& out) {
  const LinearArgs<T, WT> args{x.data_ptr<T>(), weight, bias ? bias->data_ptr<T>() : nullptr, out.data_ptr<T>(),
                               x.size(0), x.size(1), N};
  const int64_t blocks = (N + kWeightRows - 1) / kWeightRows;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    linear_columns(args, begin * kWeightRows, std::min(end * kWeightRows, N));
  });
}

}  // namespace

at::Tensor linear(const at::Tensor& x,                    // [M, K] float32 / float64, contiguous
                  const at::Tensor& weight,               // [N, K] as x, or bfloat16 under float32 x
                  const std::optional<at::Tensor>& bias) {  // [N] as x
  check_tensor(x, "x", {-1, -1}, {at::kFloat, at::kDouble});
  if (x.scalar_type() == at::kFloat) {
    check_tensor(weight, "weight", {-1, x.size(1)}, {at::kFloat, at::kBFloat16});
  } else {
    check_tensor(weight, "weight", {-1, x.size(1)}, {x.scalar_type()});
  }
  if (bias) check_tensor(*bias, "bias", {weight.size(0)}, {x.scalar_type()});
  require(x.is_contiguous(), "x must be contiguous");
  require(weight.is_contiguous(), "weight must be contiguous");
  require(!bias || bias->is_contiguous(), "bias must be contiguous");
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (weight.scalar_type() == at::kBFloat16) {  // widened exactly to float32 in the kernel
    run_linear<float>(x, reinterpret_cast<const BFloat16Bits*>(weight.data_ptr()), bias, weight.size(0), out);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "specbeam_linear", [&] {
      run_linear<scalar_t>(x, weight.data_ptr<scalar_t>(), bias, weight.size(0), out);
    });
  }
  return out;  // [M, N]
}

}  // namespace specbeam
