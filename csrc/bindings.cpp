// specbeam._C: the one binding file. Shapes and semantics: specbeam/reference/ and csrc/ops.h.
#include <torch/extension.h>

#include "ops.h"
#include "parallel.h"

// The kernels run without the GIL (as torch's own operations do): other Python threads go on meanwhile, such as
// `generate` callers preparing their requests while one of them steps the engine.
constexpr auto kFree = py::call_guard<py::gil_scoped_release>();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "specbeam's C++ CPU kernels: sampling, tree verification, paged attention, linear, decoder layers";
  m.def("filter_probs", &specbeam::filter_probs, kFree, "transformers' warpers as renormalised probabilities",
        py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"));
  m.def("sample", &specbeam::sample, kFree, "one token per row from filter_probs, by inverse CDF on noise",
        py::arg("logits"), py::arg("noise"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("min_p"));
  m.def("greedy_verify", &specbeam::greedy_verify, kFree, "greedy draft-tree verification", py::arg("parents"),
        py::arg("num_nodes"), py::arg("draft_tokens"), py::arg("target_tokens"));
  m.def("stochastic_verify", &specbeam::stochastic_verify, kFree, "tree speculative sampling", py::arg("parents"),
        py::arg("num_nodes"), py::arg("draft_tokens"), py::arg("target_probs"), py::arg("draft_probs"),
        py::arg("uniform"), py::arg("noise"));
  m.def("paged_attention", &specbeam::paged_attention, kFree, "attention of packed queries over a paged KV cache",
        py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("tree_mask"), py::arg("scale"));
  m.def("linear", &specbeam::linear, kFree, "x @ weight.T + bias, batch invariant, for a few rows of x", py::arg("x"),
        py::arg("weight"), py::arg("bias"));
  m.def("attention_inputs", &specbeam::attention_inputs, kFree, "decoder layer: rmsnorm, q/k/v projections, rope",
        py::arg("hidden"), py::arg("norm_weight"), py::arg("eps"), py::arg("q_weight"), py::arg("q_bias"),
        py::arg("k_weight"), py::arg("k_bias"), py::arg("v_weight"), py::arg("v_bias"), py::arg("cos"),
        py::arg("sin"), py::arg("head_dim"));
  m.def("serial_torch_ops", &specbeam::serial_torch_ops,
        "torch's operations on this thread run on it alone (or, serial=False, as before); the kernels keep "
        "torch's thread count", py::arg("serial"));
  m.def("mlp_block", &specbeam::mlp_block, kFree, "decoder layer: o projection, residual, rmsnorm, SwiGLU MLP, residual",
        py::arg("hidden"), py::arg("attention"), py::arg("o_weight"), py::arg("o_bias"), py::arg("norm_weight"),
        py::arg("eps"), py::arg("gate_weight"), py::arg("gate_bias"), py::arg("up_weight"), py::arg("up_bias"),
        py::arg("down_weight"), py::arg("down_bias"));
}
