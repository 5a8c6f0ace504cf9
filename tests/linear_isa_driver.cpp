// For test_linear_isa.py: csrc/kernels/linear.h on one thread, compiled once per instruction set (portable
// lanes, AVX2, AVX-512), so that the test can hold each build's bits against the others'.
// Usage: linear_isa_driver f32|bf16|f64|i8 M K N with_bias(0|1) < x, packed weight[, bias] (raw bytes) > out
// (i8: the packed weight is the N float32 column scales, then the int8 panels)
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../csrc/kernels/linear.h"

template <typename T>
std::vector<T> read(int64_t count) {
  std::vector<T> v(count);
  if (std::fread(v.data(), sizeof(T), count, stdin) != size_t(count)) std::exit(2);
  return v;
}

template <typename T, typename WT>
void run(int64_t M, int64_t K, int64_t N, bool with_bias) {
  const std::vector<T> x = read<T>(M * K);
  const std::vector<T> scale = read<T>(std::is_same_v<WT, int8_t> ? N : 0);
  const std::vector<WT> packed = read<WT>(N * K);
  const std::vector<T> bias = read<T>(with_bias ? N : 0);
  std::vector<T> out(M * N);
  const specbeam::LinearArgs<T, WT> args{x.data(), packed.data(), with_bias ? bias.data() : nullptr, out.data(),
                                         M, K, N, scale.empty() ? nullptr : scale.data()};
  specbeam::linear_units(args, 0, specbeam::linear_unit_count<T>(N));
  std::fwrite(out.data(), sizeof(T), out.size(), stdout);
}

int main(int argc, char** argv) {
  if (argc != 6) return 2;
  const int64_t M = std::atoll(argv[2]), K = std::atoll(argv[3]), N = std::atoll(argv[4]);
  const bool with_bias = std::atoi(argv[5]) != 0;
  if (!std::strcmp(argv[1], "f32")) run<float, float>(M, K, N, with_bias);
  else if (!std::strcmp(argv[1], "bf16")) run<float, specbeam::BFloat16Bits>(M, K, N, with_bias);
  else if (!std::strcmp(argv[1], "f64")) run<double, double>(M, K, N, with_bias);
  else if (!std::strcmp(argv[1], "i8")) run<float, int8_t>(M, K, N, with_bias);
  else return 2;
  return 0;
}
