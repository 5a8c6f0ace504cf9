"""Paged attention: the Triton and C++ kernels against the torch way, SDPA over the K/V gathered from the blocks
(which is the reference)."""
import pytest
import torch

from specbeam import ops

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SIZES = [(8, 1024, 1), (8, 4096, 1), (4, 1024, 16)]  # (sequences, keys each, new tokens each): decode, tree


def paged_batch(num_seqs, seq_len, num_new, device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    blocks_per_seq = seq_len // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_seq
    pool = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(pool, device=device, dtype=dtype)
    value_cache = torch.randn(pool, device=device, dtype=dtype)
    block_tables = torch.randperm(num_blocks, device=device).view(num_seqs, -1).int()
    seq_lens = torch.full((num_seqs,), seq_len, device=device, dtype=torch.int32)
    query_start_loc = torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * num_new
    query = torch.randn(num_seqs * num_new, Q_HEADS, HEAD_DIM, device=device, dtype=dtype)
    tree_mask = torch.ones(num_new, num_new, device=device, dtype=torch.bool).tril().repeat(num_seqs, 1)
    return query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tree_mask


@pytest.mark.parametrize("num_seqs, seq_len, num_new", SIZES)
def test_paged_attention(timed, backend, device, num_seqs, seq_len, num_new):
    batch = paged_batch(num_seqs, seq_len, num_new, device)
    timed(f"attention s{num_seqs} L{seq_len} new{num_new}", ops.paged_attention, *batch, backend=backend)
