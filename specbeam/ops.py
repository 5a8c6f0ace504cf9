"""One entry point per op. Each picks its backend from the tensors' device, once per call:
Triton for CUDA tensors, otherwise the plain torch reference. `backend=` forces one."""
import torch

from specbeam.reference import paged_attention as _ref_attention

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
