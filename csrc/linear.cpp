// Torch glue of the small-M linear kernel: checks, dtype dispatch, blocks of weight rows in parallel.
#include <ATen/Parallel.h>

#include <algorithm>

#include "checks.h"
#include "kernels/linear.h"
#include "ops.h"

namespace specbeam {

at::Tensor linear(const at::Tensor& x,                    // [M, K] float32 / float64, contiguous
                  const at::Tensor& weight,               // [N, K] as x (nn.Linear's layout)
                  const std::optional<at::Tensor>& bias) {  // [N] as x
  check_tensor(x, "x", {-1, -1}, {at::kFloat, at::kDouble});
  check_tensor(weight, "weight", {-1, x.size(1)}, {x.scalar_type()});
  if (bias) check_tensor(*bias, "bias", {weight.size(0)}, {x.scalar_type()});
  require(x.is_contiguous(), "x must be contiguous");
  require(weight.is_contiguous(), "weight must be contiguous");
  require(!bias || bias->is_contiguous(), "bias must be contiguous");
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "specbeam_linear", [&] {
    const LinearArgs<scalar_t> args{x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                    bias ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                    x.size(0), x.size(1), weight.size(0)};
    // whole blocks of weight rows per thread; the split cannot change a sum (kernels/linear.h)
    const int64_t blocks = (args.N + kWeightRows - 1) / kWeightRows;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      linear_columns(args, begin * kWeightRows, std::min(end * kWeightRows, args.N));
    });
  });
  return out;  // [M, N]
}

}  // namespace specbeam
