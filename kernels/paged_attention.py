"""Attention of packed queries over a paged KV cache, in Triton (flash-decoding style online softmax).

Signature, layout and visibility are those of `specbeam.reference.paged_attention.paged_attention`.
One program per (sequence, tile of its new tokens, KV head): the tile's queries of every query head that
shares the KV head form the rows of one matrix, so grouped-query attention reads each key once per tile.
The program walks the sequence's keys BLOCK_N at a time through the block table, keeping a running max and
sum per row, and masks what a row may not see: nothing of the committed prefix, and among the new tokens
those outside its tree-mask row (or, without a tree mask, those after it).
"""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _visible(pos, seq_len, num_new, token, row_ptr, mask_col_stride, HAS_TREE_MASK: tl.constexpr):
    """[rows, BLOCK_N] whether each row's query (token: its index among the new tokens) sees key `pos`."""
    rel = pos[None, :] - (seq_len - num_new)  # key position relative to the first new token
    is_new = (rel >= 0) & (pos[None, :] < seq_len)
    if HAS_TREE_MASK:
        in_mask = is_new & (token[:, None] < num_new)
        sees_new = tl.load(row_ptr[:, None] + rel * mask_col_stride, mask=in_mask, other=0) != 0
    else:
        sees_new = rel <= token[:, None]  # causal among the new tokens
    return (rel < 0) | (is_new & sees_new)


@triton.jit
def _paged_attention_kernel(
    query_ptr,  # [num_queries, num_q_heads, head_dim]
    key_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_queries, num_q_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    tree_mask_ptr,  # [num_queries, max_new] bool, or None
    scale,
    q_stride_t, q_stride_h, q_stride_d,
    k_stride_b, k_stride_s, k_stride_h, k_stride_d,
    v_stride_b, v_stride_s, v_stride_h, v_stride_d,
    o_stride_t, o_stride_h, o_stride_d,
    table_stride, mask_row_stride, mask_col_stride,
    block_size, group, head_dim,
    HAS_TREE_MASK: tl.constexpr,
    TOKENS: tl.constexpr,  # new tokens per tile
    GROUP: tl.constexpr,  # query heads per KV head, padded to a power of two
    HEAD: tl.constexpr,  # head_dim padded to a power of two
    BLOCK_N: tl.constexpr,  # keys per step
    UPCAST: tl.constexpr,  # multiply in float32
):
    seq, tile, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first = tl.load(query_start_loc_ptr + seq)
    num_new = tl.load(query_start_loc_ptr + seq + 1) - first

    # rows: (token, head) pairs of this tile
    rows = tl.arange(0, TOKENS * GROUP)
    token = tile * TOKENS + rows // GROUP
    head = kv_head * group + rows % GROUP
    row_ok = (token < num_new) & (rows % GROUP < group)
    dims = tl.arange(0, HEAD)
    dim_ok = dims < head_dim
    q_offsets = (first + token)[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :] * q_stride_d
    query = tl.load(query_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:  # keys, values and weights follow the query's dtype into tl.dot
        query = query.to(tl.float32)
    mask_rows = tree_mask_ptr + (first + token) * mask_row_stride if HAS_TREE_MASK else tree_mask_ptr

    running_max = tl.full([TOKENS * GROUP], -1e30, tl.float32)  # finite: a row that sees nothing stays 0
    running_sum = tl.zeros([TOKENS * GROUP], tl.float32)
    acc = tl.zeros([TOKENS * GROUP, HEAD], tl.float32)
    # causal: no key past the tile's last new token; a tree mask may point anywhere among the new tokens
    keys_needed = seq_len - num_new + tl.minimum((tile + 1) * TOKENS, num_new)
    if HAS_TREE_MASK:
        keys_needed = seq_len
    keys_needed = tl.where(tile * TOKENS < num_new, keys_needed, 0)
    for start in range(0, keys_needed, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        block = tl.load(block_tables_ptr + seq * table_stride + pos // block_size, mask=pos < seq_len, other=0)
        block, slot = block.to(tl.int64)[:, None], (pos % block_size)[:, None]
        kv_ok = (pos < seq_len)[:, None] & dim_ok[None, :]
        k_offsets = block * k_stride_b + slot * k_stride_s + kv_head * k_stride_h + dims[None, :] * k_stride_d
        v_offsets = block * v_stride_b + slot * v_stride_s + kv_head * v_stride_h + dims[None, :] * v_stride_d
        key = tl.load(key_ptr + k_offsets, mask=kv_ok, other=0.0).to(query.dtype)
        value = tl.load(value_ptr + v_offsets, mask=kv_ok, other=0.0).to(query.dtype)

        scores = tl.dot(query, tl.trans(key), input_precision="ieee") * scale  # [rows, BLOCK_N]
        visible = _visible(pos, seq_len, num_new, token, mask_rows, mask_col_stride, HAS_TREE_MASK)
        scores = tl.where(visible, scores, float("-inf"))
        # online softmax: rescale what was summed under the old max to the new one
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights.to(value.dtype), value, input_precision="ieee")
        running_max = new_max

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    o_offsets = (first + token)[:, None] * o_stride_t + head[:, None] * o_stride_h + dims[None, :] * o_stride_d
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _tiling(max_new: int, group: int) -> tuple[int, int]:
    """(TOKENS, GROUP): rows = TOKENS * GROUP between 16 (tl.dot's minimum) and 64."""
    group_pad = triton.next_power_of_2(group)
    tokens = min(triton.next_power_of_2(max_new), max(1, 64 // group_pad))
    return max(tokens, 16 // group_pad, 1), group_pad


def paged_attention(
    query: torch.Tensor,  # [num_queries, num_q_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    seq_lens: torch.Tensor,  # [num_seqs] int: keys of each sequence, its new tokens included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int: cumulative count of new tokens
    tree_mask: torch.Tensor | None = None,  # [num_queries, max_new] bool; None: causal
    scale: float | None = None,
) -> torch.Tensor:  # [num_queries, num_q_heads, head_dim]
    """See `specbeam.reference.paged_attention.paged_attention`."""
    num_seqs, head_dim = seq_lens.shape[0], query.shape[2]
    group = query.shape[1] // key_cache.shape[2]
    max_new = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    tokens, group_pad = _tiling(max_new, group)
    out = torch.empty_like(query)
    if tree_mask is not None:
        tree_mask = tree_mask.view(torch.uint8)
    mask_strides = tree_mask.stride() if tree_mask is not None else (0, 0)
    grid = (num_seqs, triton.cdiv(max_new, tokens), key_cache.shape[2])
    _paged_attention_kernel[grid](
        query, key_cache, value_cache, out, block_tables, seq_lens, query_start_loc, tree_mask,
        head_dim**-0.5 if scale is None else scale,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(),
        block_tables.stride(0), *mask_strides,
        key_cache.shape[1], group, head_dim,
        HAS_TREE_MASK=tree_mask is not None,
        TOKENS=tokens,
        GROUP=group_pad,
        HEAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=64 if head_dim <= 64 else 32,
        # the CPU interpreter's tl.dot multiplies bfloat16 bit patterns as integers: upcast there
        UPCAST=query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
    )
    return out
