// Torch glue of the small-M linear kernel: checks, dtype dispatch, groups of panels in parallel.

#include <algorithm>

#include "checks.h"
#include "kernels/linear.h"
#include "ops.h"
#include "parallel.h"

namespace specbeam {
namespace {

// out = x @ weight.T + bias over whole panels per thread; the split cannot change a sum
template <typename T, typename WT>
void run_linear(const at::Tensor& x, const WT* packed, const std::optional<at::Tensor>& bias, at::Tensor& out,
                const T* scale = nullptr) {
  const LinearArgs<T, WT> args{x.data_ptr<T>(), packed, bias ? bias->data_ptr<T>() : nullptr, out.data_ptr<T>(),
                               x.size(0), x.size(1), out.size(1), scale};
  parallel_for(0, linear_unit_count<T>(args.N), 4,
               [&](int64_t begin, int64_t end) { linear_units(args, begin, end); });
}

}  // namespace

at::Tensor linear(const at::Tensor& x,                      // [M, K] float32 / float64, contiguous
                  const at::Tensor& packed,                 // [N, K] elements packed (kernels/linear.h); int8: [N, K + 4]
                  const std::optional<at::Tensor>& bias) {  // [N] as x
  check_tensor(x, "x", {-1, -1}, {at::kFloat, at::kDouble});
  const int64_t K = x.size(1) + int8_scale_columns(packed);
  if (x.scalar_type() == at::kFloat) {
    check_tensor(packed, "weight", {-1, K}, {at::kFloat, at::kBFloat16, at::kChar});
  } else {
    check_tensor(packed, "weight", {-1, K}, {x.scalar_type()});
  }
  if (bias) check_tensor(*bias, "bias", {packed.size(0)}, {x.scalar_type()});
  require(x.is_contiguous(), "x must be contiguous");
  require(packed.is_contiguous(), "weight must be contiguous");
  require(!bias || bias->is_contiguous(), "bias must be contiguous");
  auto out = at::empty({x.size(0), packed.size(0)}, x.options());
  if (packed.scalar_type() == at::kBFloat16) {  // widened exactly to float32 in the kernel
    run_linear<float>(x, reinterpret_cast<const BFloat16Bits*>(packed.data_ptr()), bias, out);
  } else if (packed.scalar_type() == at::kChar) {  // the N column scales (float32), then the panels of q
    const auto* bytes = static_cast<const int8_t*>(packed.data_ptr());
    run_linear<float>(x, bytes + 4 * packed.size(0), bias, out, reinterpret_cast<const float*>(bytes));
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "specbeam_linear", [&] {
      run_linear<scalar_t>(x, packed.data_ptr<scalar_t>(), bias, out);
    });
  }
  return out;  // [M, N]
}

}  // namespace specbeam
