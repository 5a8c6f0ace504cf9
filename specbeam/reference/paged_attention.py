"""Attention of packed queries over a paged KV cache, in plain torch.

Layout. K and V live in pools `[num_blocks, block_size, num_kv_heads, head_dim]`. Sequence s owns the
blocks `block_tables[s]`; its key at position j sits in block `block_tables[s, j // block_size]`, offset
`j % block_size`. The queries of sequence s are rows `query_start_loc[s]:query_start_loc[s + 1]` of `query`:
its n_s newest tokens, whose K/V are already stored at positions `seq_lens[s] - n_s ... seq_lens[s] - 1`.

Visibility. Query t of sequence s sees every key of the committed prefix (j < seq_lens[s] - n_s) and the new
tokens c with `tree_mask[row, c]` (its ancestors in the draft tree and itself). Without a tree mask the
new tokens are a chain and the mask is causal: c <= t. Decode is the case n_s = 1.

The index work depends only on the step's metadata, so `plan_attention` does it once per forward and
`attend` runs per layer: gather each sequence's K/V in position order, one masked SDPA.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def store_kv(
    key_slots: torch.Tensor,  # [num_blocks * block_size, num_kv_heads, head_dim]: the K pool seen as slots
    value_slots: torch.Tensor,  # [num_blocks * block_size, num_kv_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int: block * block_size + offset
) -> None:
    key_slots.index_copy_(0, slot_mapping, key.to(key_slots.dtype))
    value_slots.index_copy_(0, slot_mapping, value.to(value_slots.dtype))


@dataclass
class AttentionPlan:
    slots: torch.Tensor  # [num_seqs, max_len] flat slot of each key position
    visible: torch.Tensor | None  # [num_seqs, 1, max_new, max_len] bool; None: every key is visible
    seq_of_query: torch.Tensor  # [num_queries]
    local_idx: torch.Tensor  # [num_queries] index among its sequence's new tokens
    one_query_each: bool  # decode: queries map 1:1 onto sequences, no scatter needed


def _visible_keys(
    seq_lens: torch.Tensor,  # [num_seqs]
    num_new: torch.Tensor,  # [num_seqs]
    tree_mask: torch.Tensor | None,  # [num_queries, mask_width] bool
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    max_new: int,
    max_len: int,
) -> torch.Tensor:  # [num_seqs, max_new, max_len] bool
    device = seq_lens.device
    key_pos = torch.arange(max_len, device=device)
    query_idx = torch.arange(max_new, device=device)
    rel = key_pos[None, :] - (seq_lens - num_new)[:, None]  # [S, L]: key position relative to the first new token
    in_prefix = rel < 0
    is_new = (rel >= 0) & (rel < num_new[:, None])
    if tree_mask is None:
        new_visible = rel[:, None, :] <= query_idx[None, :, None]  # causal among the new tokens
    else:
        rows = (query_start_loc[:-1, None] + query_idx[None, :]).clamp(max=tree_mask.shape[0] - 1)  # [S, max_new]
        cols = rel.clamp(0, tree_mask.shape[1] - 1)  # [S, L]
        new_visible = torch.gather(tree_mask[rows], 2, cols[:, None, :].expand(-1, max_new, -1))
    visible = in_prefix[:, None, :] | (is_new[:, None, :] & new_visible)
    # padding rows (t >= n_s) see key 0 only, so that softmax stays finite; they are dropped afterwards
    is_pad_row = query_idx[None, :] >= num_new[:, None]  # [S, max_new]
    return visible | (is_pad_row[:, :, None] & (key_pos == 0)[None, None, :])


def plan_attention(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    seq_lens: torch.Tensor,  # [num_seqs] int: keys of each sequence, its new tokens included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int: cumulative count of new tokens
    tree_mask: torch.Tensor | None,  # [num_queries, max_new] bool; None: causal
    block_size: int,
) -> AttentionPlan:
    num_seqs, device = seq_lens.shape[0], seq_lens.device
    num_new = query_start_loc[1:] - query_start_loc[:-1]
    max_len, max_new = int(seq_lens.max()), int(num_new.max())
    key_pos = torch.arange(max_len, device=device)
    block_idx = (key_pos // block_size).clamp(max=block_tables.shape[1] - 1)
    seq_of_query = torch.repeat_interleave(torch.arange(num_seqs, device=device), num_new)
    visible = _visible_keys(seq_lens, num_new, tree_mask, query_start_loc, max_new, max_len)[:, None]
    return AttentionPlan(
        slots=block_tables[:, block_idx].long() * block_size + key_pos % block_size,
        visible=None if bool(visible.all()) else visible,  # e.g. decoding one sequence: no mask, faster SDPA
        seq_of_query=seq_of_query,
        local_idx=torch.arange(seq_of_query.shape[0], device=device) - query_start_loc[seq_of_query],
        one_query_each=max_new == 1 and seq_of_query.shape[0] == num_seqs,
    )


def attend(
    query: torch.Tensor,  # [num_queries, num_q_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    plan: AttentionPlan,
    scale: float | None = None,
) -> torch.Tensor:  # [num_queries, num_q_heads, head_dim]
    keys = key_cache.reshape(-1, *key_cache.shape[2:])[plan.slots]  # [S, L, Hkv, D]
    values = value_cache.reshape(-1, *value_cache.shape[2:])[plan.slots]
    if plan.one_query_each:
        queries = query[:, None]  # [S, 1, Hq, D]
    else:
        queries = query.new_zeros(plan.slots.shape[0], int(plan.local_idx.max()) + 1, *query.shape[1:])
        queries[plan.seq_of_query, plan.local_idx] = query
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2),
        keys.transpose(1, 2).to(query.dtype),
        values.transpose(1, 2).to(query.dtype),
        attn_mask=plan.visible,
        scale=scale,
        enable_gqa=query.shape[1] != key_cache.shape[2],
    ).transpose(1, 2)  # [S, max_new, Hq, D]
    return out[:, 0] if plan.one_query_each else out[plan.seq_of_query, plan.local_idx]


def attend_fresh(
    query: torch.Tensor,  # [num_queries, num_q_heads, head_dim]
    key: torch.Tensor,  # [num_queries, num_kv_heads, head_dim]: the new tokens' own keys
    value: torch.Tensor,  # [num_queries, num_kv_heads, head_dim]
    starts: list[int],  # [num_seqs + 1] cumulative count of new tokens
    scale: float | None = None,
) -> torch.Tensor:  # [num_queries, num_q_heads, head_dim]
    """Sequences with no keys cached before their new tokens (prompts): each attends causally over its own new
    K/V, one SDPA each, so that a prompt's result does not depend on the others (`attend` would pad every one
    to the longest and score the pairs its mask hides)."""
    out = torch.empty_like(query)
    for start, end in zip(starts, starts[1:]):
        q, k, v = (x[None, start:end].transpose(1, 2) for x in (query, key, value))  # [1, heads, n, head_dim]
        out[start:end] = F.scaled_dot_product_attention(  # batched, as SDPA's flash kernel takes it on the CPU
            q, k, v, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1])[0].transpose(0, 1)
    return out


def paged_attention(
    query: torch.Tensor,  # [num_queries, num_q_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    seq_lens: torch.Tensor,  # [num_seqs] int
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    tree_mask: torch.Tensor | None = None,  # [num_queries, max_new] bool; None: causal
    scale: float | None = None,
) -> torch.Tensor:  # [num_queries, num_q_heads, head_dim]
    plan = plan_attention(block_tables, seq_lens, query_start_loc, tree_mask, key_cache.shape[1])
    return attend(query, key_cache, value_cache, plan, scale)
