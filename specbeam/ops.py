"""One entry point per op. Each picks its backend from the tensors' device, once per call: Triton for CUDA
tensors, the C++ kernels for CPU tensors (`specbeam._C` built at install, else compiled at first use by
`specbeam.cpp_build`), otherwise the plain torch reference. `backend=` forces one; `backend_info()` says which one
CPU calls get, and why."""
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from specbeam import cpp_build, linear_weight
from specbeam.reference import decoder as _ref_decoder
from specbeam.reference import paged_attention as _ref_attention
from specbeam.reference import sampling as _ref_sampling
from specbeam.reference import tree_verify as _ref_tree_verify

BACKENDS = ("reference", "triton", "cpp")
CPP_OPS = ("filter_probs", "sample", "greedy_verify", "stochastic_verify", "paged_attention", "linear",
           "attention_inputs", "mlp_block")


@functools.cache
def _load_cpp() -> tuple[object | None, str]:
    """(the C++ kernels' module, how it was built), or (None, why not); once, on first use. specbeam._C if the
    install built it, else the kernels compiled at first use (unless SPECBEAM_NO_JIT=1), else None with one
    warning: the CPU runs the reference."""
    try:
        from specbeam import _C
        return _C, "built at install"
    except ImportError:
        pass
    if os.environ.get("SPECBEAM_NO_JIT") == "1":
        return None, "specbeam._C not built at install, and SPECBEAM_NO_JIT=1"
    try:
        module, build = cpp_build.load()
    except Exception as error:  # noqa: BLE001: whatever stops the build, the reference runs
        reason = f"specbeam._C not built at install, nor at first use: {error}"
        warnings.warn(f"specbeam runs its torch reference on the CPU, 2-3x slower ({reason})", stacklevel=2)
        return None, reason
    return module, f"compiled at first use ({build})"


def _cpp():
    """The C++ kernels' module, or a clear error when backend="cpp" is forced without it."""
    module, reason = _load_cpp()
    if module is None:
        raise RuntimeError(f"backend='cpp' needs the C++ kernels: {reason}")
    return module


def backend_info() -> dict[str, str]:
    """Per op, the backend that CPU tensors get with backend=None, and why: "cpp: built at install",
    "cpp: compiled at first use (<build directory>)" or "reference: <why>"."""
    module, reason = _load_cpp()
    picked = f"cpp: {reason}" if module is not None else f"reference: {reason}"
    return {"store_kv": "reference: torch index_copy_", **{op: picked for op in CPP_OPS}}


def _pick(backend: str | None, device: torch.device) -> str:
    if backend is None:
        if device.type == "cuda":
            return "triton"
        return "cpp" if _load_cpp()[0] is not None else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def serial_torch_ops(serial: bool) -> None:
    """serial: torch's own operations on the calling thread run on it alone, and the C++ kernels keep torch's
    thread count there (on specbeam's worker team): a thread other than the main one stepping the engine would
    otherwise open a second OpenMP team, and two teams on the same cores make libgomp wake their workers through
    the kernel for every parallel region (csrc/parallel.h). Not serial: the thread's torch operations as they
    were. On the main thread, or without the C++ backend: nothing."""
    module, _ = _load_cpp()
    if module is not None:
        module.serial_torch_ops(serial)


def store_kv(key_slots, value_slots, key, value, slot_mapping) -> None:
    """Write new K/V rows into their slots of the pools (shapes: `specbeam.reference.paged_attention`)."""
    _ref_attention.store_kv(key_slots, value_slots, key, value, slot_mapping)


def plan_attention(block_tables, seq_lens, query_start_loc, tree_mask, block_size, backend=None, fresh=False):
    """The per-step part of paged attention, done once per forward and shared by every layer. fresh: no sequence
    has keys cached before its new tokens (a prefill of prompts): where neither C++ nor Triton attends, each then
    attends causally over its own new K/V."""
    chosen = _pick(backend, seq_lens.device)
    if chosen == "triton":
        return ("triton", (block_tables, seq_lens, query_start_loc, tree_mask))
    if chosen == "cpp":  # the metadata as _C takes it: int64, contiguous
        tables, lens, starts = (t.long().contiguous() for t in (block_tables, seq_lens, query_start_loc))
        return ("cpp", (tables, lens, starts, None if tree_mask is None else tree_mask.contiguous()))
    if fresh and tree_mask is None:
        return ("fresh", query_start_loc.tolist())
    return ("reference", _ref_attention.plan_attention(block_tables, seq_lens, query_start_loc, tree_mask, block_size))


def attend(query, key_cache, value_cache, plan, scale=None, key=None, value=None):
    """Per-layer paged attention over a plan from `plan_attention`; key, value: this forward's new K/V, which a
    "fresh" plan reads instead of the pools."""
    backend, data = plan
    if backend == "fresh":
        return _ref_attention.attend_fresh(query, key, value, data, scale)
    if backend == "triton":
        from specbeam.kernels import paged_attention as kernel

        return kernel.paged_attention(query, key_cache, value_cache, *data, scale)
    if backend == "cpp":
        return _cpp().paged_attention(query, key_cache, value_cache, *data, scale)
    return _ref_attention.attend(query, key_cache, value_cache, data, scale)


def paged_attention(
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tree_mask=None, scale=None, backend=None
):
    """Attention of packed queries over the paged KV cache; see `specbeam.reference.paged_attention`."""
    plan = plan_attention(block_tables, seq_lens, query_start_loc, tree_mask, key_cache.shape[1], backend)
    return attend(query, key_cache, value_cache, plan, scale)


def linear(x, weight, bias=None, backend=None):
    """x [M, K] @ weight.T + bias -> [M, N]; weight [N, K] in nn.Linear's layout, or a `LinearWeight` prepared
    once (`specbeam.linear_weight.prepare`). The C++ kernel reads the weight packed into column panels (packing
    an unprepared one on every call) and is batch invariant: a row's result is bitwise the same whatever the
    other rows and the thread count (csrc/kernels/linear.h); it takes contiguous float32 / float64 x (other
    dtypes get F.linear unless backend="cpp" is forced). Under float32 x the weight may be bfloat16: each element
    is widened exactly, so a bfloat16-exact float32 weight gives the same bits from half the bytes.
    There is no Triton kernel: CUDA tensors (and backend="triton") get torch's F.linear, without that promise."""
    chosen = _pick(backend, x.device)
    if chosen == "cpp" and (backend == "cpp" or x.dtype in linear_weight.KERNEL_FLOATS):
        return _cpp().linear(x, linear_weight.for_kernel(weight, x.dtype), bias)
    weight = linear_weight.for_torch(weight)
    if weight.dtype == torch.bfloat16 and x.dtype == torch.float32:
        weight = weight.float()  # exact
    return F.linear(x, weight, bias)


def filter_probs(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, backend=None):
    """transformers' temperature, top-k, top-p, min-p warpers as renormalised probabilities [batch, vocab];
    parameters are scalars or [batch] tensors. Semantics and ties: `specbeam.reference.sampling`."""
    backend = _pick(backend, logits.device)
    if backend == "triton":
        from specbeam.kernels import sampling as kernel

        return kernel.filter_probs(logits, temperature, top_k, top_p, min_p)
    if backend == "cpp":
        return _cpp().filter_probs(logits, *_ref_sampling.sampling_params(logits, temperature, top_k, top_p, min_p))
    return _ref_sampling.filter_probs(logits, temperature, top_k, top_p, min_p)


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, noise=None, generator=None, backend=None):
    """One token per row [batch] from `filter_probs`; temperature 0 is argmax. `noise` [batch] holds one uniform
    in [0, 1) per row (inverse CDF); without it the uniforms are drawn from `generator`."""
    if noise is None:
        noise = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    elif noise.shape != logits.shape[:1]:
        raise ValueError(f"noise must have shape [{logits.shape[0]}] (one uniform per row), got {tuple(noise.shape)}")
    backend = _pick(backend, logits.device)
    if backend == "triton":
        from specbeam.kernels import sampling as kernel

        return kernel.sample(logits, noise, temperature, top_k, top_p, min_p)
    if backend == "cpp":
        return _cpp().sample(logits, noise, *_ref_sampling.sampling_params(logits, temperature, top_k, top_p, min_p))
    return _ref_sampling.sample(logits, noise, temperature, top_k, top_p, min_p)


def greedy_verify(parents, num_nodes, draft_tokens, target_tokens, *, backend=None):
    """Deepest draft-tree path the target's argmax agrees with: (path, num_accepted, next_token);
    see `specbeam.reference.tree_verify`."""
    backend = _pick(backend, parents.device)
    if backend == "triton":
        from specbeam.kernels import tree_verify as kernel

        return kernel.greedy_verify(parents, num_nodes, draft_tokens, target_tokens)
    if backend == "cpp":
        return _cpp().greedy_verify(parents, num_nodes, draft_tokens, target_tokens)
    return _ref_tree_verify.greedy_verify(parents, num_nodes, draft_tokens, target_tokens)


def stochastic_verify(parents, num_nodes, draft_tokens, target_probs, draft_probs, uniform, noise, *, backend=None):
    """Tree speculative sampling, exact for the target's distribution: (path, num_accepted, next_token).
    `uniform` [batch, num_nodes] decides on each node, `noise` [batch] draws the recovered or bonus token;
    see `specbeam.reference.tree_verify`."""
    args = (parents, num_nodes, draft_tokens, target_probs, draft_probs, uniform, noise)
    backend = _pick(backend, parents.device)
    if backend == "triton":
        from specbeam.kernels import tree_verify as kernel

        return kernel.stochastic_verify(*args)
    if backend == "cpp":
        return _cpp().stochastic_verify(*args)
    return _ref_tree_verify.stochastic_verify(*args)


def attention_inputs(hidden, norm_weight, eps, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, cos, sin,
                     head_dim, *, backend=None):
    """A decoder layer up to its attention: rmsnorm, q/k/v projections, rope -> (query, key, value);
    see `specbeam.reference.decoder`. Weights as `linear` takes them. C++ for float32 / float64 CPU tensors (as
    `layer_backend` chooses); no Triton kernel: CUDA runs the reference's torch ops."""
    cpp = _takes_layer(backend, hidden)
    q, k, v = (_layer_weight(w, hidden.dtype, cpp) for w in (q_weight, k_weight, v_weight))
    args = (hidden, norm_weight, eps, q, q_bias, k, k_bias, v, v_bias, cos, sin, head_dim)
    return _cpp().attention_inputs(*args) if cpp else _ref_decoder.attention_inputs(*args)


def mlp_block(hidden, attention, o_weight, o_bias, norm_weight, eps, gate_weight, gate_bias, up_weight, up_bias,
              down_weight, down_bias, *, backend=None):
    """A decoder layer after its attention: o projection, residual, rmsnorm, SwiGLU MLP, residual;
    see `specbeam.reference.decoder`. Weights and backends as `attention_inputs`."""
    cpp = _takes_layer(backend, hidden)
    o, gate, up, down = (_layer_weight(w, hidden.dtype, cpp) for w in (o_weight, gate_weight, up_weight, down_weight))
    args = (hidden, attention, o, o_bias, norm_weight, eps, gate, gate_bias, up, up_bias, down, down_bias)
    return _cpp().mlp_block(*args) if cpp else _ref_decoder.mlp_block(*args)


def layer_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, object]:
    """For a model's decoder layers, chosen once: ("cpp", the C++ kernels) for a float32 / float64 CPU model when
    they are built, else ("reference", specbeam.reference.decoder). Each offers attention_inputs, mlp_block
    and linear; the C++ ones read weights packed by `specbeam.linear_weight.prepare`."""
    if _pick(None, device) == "cpp" and dtype in linear_weight.KERNEL_FLOATS:
        return "cpp", _cpp()
    return "reference", _ref_decoder


def _takes_layer(backend: str | None, hidden: torch.Tensor) -> bool:
    """Whether a decoder layer half runs in C++: forced, or as `layer_backend` chooses for hidden's device and dtype."""
    if backend is not None:
        return _pick(backend, hidden.device) == "cpp"
    return layer_backend(hidden.device, hidden.dtype)[0] == "cpp"


def _layer_weight(weight, x_dtype: torch.dtype, cpp: bool) -> torch.Tensor:  # [N, K]
    return linear_weight.for_kernel(weight, x_dtype) if cpp else linear_weight.for_torch(weight)
