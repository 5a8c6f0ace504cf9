"""One entry point per op. Each picks its backend from the tensors' device, once per call:
Triton for CUDA tensors, otherwise the plain torch reference. `backend=` forces one."""
import torch

from specbeam.reference import paged_attention as _ref_attention
from specbeam.reference import sampling as _ref_sampling
from specbeam.reference import tree_verify as _ref_tree_verify

BACKENDS = ("reference", "triton")


def _pick(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def store_kv(key_cache, value_cache, key, value, slot_mapping) -> None:
    """Write new K/V rows into their slots of the paged pools (shapes: `specbeam.reference.paged_attention`)."""
    _ref_attention.store_kv(key_cache, value_cache, key, value, slot_mapping)


def plan_attention(block_tables, seq_lens, query_start_loc, tree_mask, block_size, backend=None):
    """The per-step part of paged attention, done once per forward and shared by every layer."""
    backend = _pick(backend, seq_lens.device)
    if backend == "triton":
        return ("triton", (block_tables, seq_lens, query_start_loc, tree_mask))
    return ("reference", _ref_attention.plan_attention(block_tables, seq_lens, query_start_loc, tree_mask, block_size))


def attend(query, key_cache, value_cache, plan, scale=None):
    """Per-layer paged attention over a plan from `plan_attention`."""
    backend, data = plan
    if backend == "triton":
        from specbeam.kernels import paged_attention as kernel

        return kernel.paged_attention(query, key_cache, value_cache, *data, scale)
    return _ref_attention.attend(query, key_cache, value_cache, data, scale)


def paged_attention(
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tree_mask=None, scale=None, backend=None
):
    """Attention of packed queries over the paged KV cache; see `specbeam.reference.paged_attention`."""
    if _pick(backend, query.device) == "triton":
        from specbeam.kernels import paged_attention as kernel

        return kernel.paged_attention(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tree_mask, scale
        )
    return _ref_attention.paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tree_mask, scale
    )


def filter_probs(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, backend=None):
    """transformers' temperature, top-k, top-p, min-p warpers as renormalised probabilities [batch, vocab];
    parameters are scalars or [batch] tensors. Semantics and ties: `specbeam.reference.sampling`."""
    if _pick(backend, logits.device) == "triton":
        from specbeam.kernels import sampling as kernel

        return kernel.filter_probs(logits, temperature, top_k, top_p, min_p)
    return _ref_sampling.filter_probs(logits, temperature, top_k, top_p, min_p)


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, noise=None, generator=None, backend=None):
    """One token per row [batch] from `filter_probs`; temperature 0 is argmax. `noise` [batch] holds one uniform
    in [0, 1) per row (inverse CDF); without it the uniforms are drawn from `generator`."""
    if noise is None:
        noise = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    elif noise.shape != logits.shape[:1]:
        raise ValueError(f"noise must have shape [{logits.shape[0]}] (one uniform per row), got {tuple(noise.shape)}")
    if _pick(backend, logits.device) == "triton":
        from specbeam.kernels import sampling as kernel

        return kernel.sample(logits, noise, temperature, top_k, top_p, min_p)
    return _ref_sampling.sample(logits, noise, temperature, top_k, top_p, min_p)


def greedy_verify(parents, num_nodes, draft_tokens, target_tokens, *, backend=None):
    """Deepest draft-tree path the target's argmax agrees with: (path, num_accepted, next_token);
    see `specbeam.reference.tree_verify`."""
    if _pick(backend, parents.device) == "triton":
        from specbeam.kernels import tree_verify as kernel

        return kernel.greedy_verify(parents, num_nodes, draft_tokens, target_tokens)
    return _ref_tree_verify.greedy_verify(parents, num_nodes, draft_tokens, target_tokens)


def stochastic_verify(parents, num_nodes, draft_tokens, target_probs, draft_probs, uniform, noise, *, backend=None):
    """Tree speculative sampling, exact for the target's distribution: (path, num_accepted, next_token).
    `uniform` [batch, num_nodes] decides on each node, `noise` [batch] draws the recovered or bonus token;
    see `specbeam.reference.tree_verify`."""
    args = (parents, num_nodes, draft_tokens, target_probs, draft_probs, uniform, noise)
    if _pick(backend, parents.device) == "triton":
        from specbeam.kernels import tree_verify as kernel

        return kernel.stochastic_verify(*args)
    return _ref_tree_verify.stochastic_verify(*args)
