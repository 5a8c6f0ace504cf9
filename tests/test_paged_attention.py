"""paged_attention, every backend, against the reference run in float64: decode, causal and tree-masked new
tokens, grouped-query heads, awkward head and block sizes, shuffled block tables, non-contiguous pools."""
import pytest
import torch

from specbeam import ops

BACKENDS = ("reference", "triton", "cpp")
TOLERANCES = [  # (dtype, atol, rtol) against the float64 oracle
    (torch.float32, 2e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]


def tree_mask_rows(num_new, gen):  # [num_new, num_new] bool: each new token sees its ancestors and itself
    mask = torch.eye(num_new, dtype=torch.bool)
    for node in range(1, num_new):
        mask[node] |= mask[torch.randint(0, node, (), generator=gen)]
    return mask


def make_batch(seq_lens, num_new, q_heads, kv_heads, head_dim, block_size, dtype, tree, contiguous, gen):
    """Queries, pools filled at every position through shuffled block tables, and the metadata."""
    seq_lens, num_new = torch.tensor(seq_lens), torch.tensor(num_new)
    blocks_per_seq = -(-int(seq_lens.max()) // block_size)
    num_blocks = len(seq_lens) * blocks_per_seq + 3  # a few blocks nobody owns
    block_tables = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * blocks_per_seq].view(len(seq_lens), -1)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    if contiguous:
        key_cache, value_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    else:  # pools laid out [blocks, heads, slots, dim], seen as [blocks, slots, heads, dim]
        key_cache = torch.zeros(num_blocks, kv_heads, block_size, head_dim, dtype=dtype).transpose(1, 2)
        value_cache = torch.zeros(num_blocks, kv_heads, block_size, head_dim, dtype=dtype).transpose(1, 2)
    for seq, length in enumerate(seq_lens.tolist()):
        pos = torch.arange(length)
        blocks, slots = block_tables[seq, pos // block_size], pos % block_size
        key_cache[blocks, slots] = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        value_cache[blocks, slots] = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.long), num_new.cumsum(0)])
    query = torch.randn(int(num_new.sum()), q_heads, head_dim, generator=gen).to(dtype)
    mask = None
    if tree:
        mask = torch.zeros(int(num_new.sum()), int(num_new.max()), dtype=torch.bool)
        for seq, n in enumerate(num_new.tolist()):
            mask[query_start_loc[seq] : query_start_loc[seq] + n, :n] = tree_mask_rows(n, gen)
    return query, key_cache, value_cache, block_tables.int(), seq_lens.int(), query_start_loc.int(), mask


CASES = {  # seq_lens, num_new, q_heads, kv_heads, head_dim, block_size, tree
    "decode_gqa_d64": ([1, 17, 64, 100], [1, 1, 1, 1], 8, 2, 64, 16, False),
    "decode_mha_d96": ([33, 5], [1, 1], 2, 2, 96, 16, False),
    "decode_mqa_d128": ([40], [1], 4, 1, 128, 16, False),
    "causal_prefill_d16": ([9, 30, 3], [9, 12, 1], 4, 2, 16, 5, False),
    "tree_d32": ([20, 11, 26], [6, 1, 9], 6, 3, 32, 4, True),
    # the C++ kernel's tiles of 16 new tokens and its 16-key lanes: several tiles, blocks wider than the lanes
    "causal_tiles_d64": ([50, 40], [40, 17], 8, 2, 64, 16, False),
    "tree_tiles_d8": ([60, 30], [35, 20], 4, 2, 8, 24, True),
}


def as_float64(tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(backend, dtype, atol, rtol, case, device):
    *shape, tree = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    batch = make_batch(*shape, dtype=dtype, tree=tree, contiguous=True, gen=gen)
    expected = ops.paged_attention(*as_float64(batch), backend="reference")
    out = ops.paged_attention(*[t.to(device) if t is not None else t for t in batch], backend=backend)
    assert out.dtype == dtype and out.shape == batch[0].shape
    torch.testing.assert_close(out.cpu().double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_pools_and_scale(backend, device):
    gen = torch.Generator().manual_seed(5)
    batch = make_batch([25, 7], [5, 1], 4, 2, 32, 8, torch.float32, tree=True, contiguous=False, gen=gen)
    assert not batch[1].is_contiguous()
    expected = ops.paged_attention(*as_float64(batch), scale=0.3, backend="reference")
    out = ops.paged_attention(*[t.to(device) for t in batch], scale=0.3, backend=backend)
    torch.testing.assert_close(out.cpu().double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_sees_only_its_visible_keys(backend, device):
    """Keys a query may not see are set to huge values: the output must not move."""
    gen = torch.Generator().manual_seed(6)
    query, key_cache, value_cache, tables, seq_lens, starts, mask = make_batch(
        [12], [4], 2, 1, 16, 4, torch.float32, tree=True, contiguous=True, gen=gen
    )
    mask[:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    args = [t.to(device) for t in (tables, seq_lens, starts, mask)]
    before = ops.paged_attention(query.to(device), key_cache.to(device), value_cache.to(device), *args, backend=backend)
    # new token 1 (position 9) is seen only by query 1: poison it and check the other rows
    key_cache[tables[0, 9 // 4], 9 % 4] = 1e4
    value_cache[tables[0, 9 // 4], 9 % 4] = 1e4
    after = ops.paged_attention(query.to(device), key_cache.to(device), value_cache.to(device), *args, backend=backend)
    unaffected = [0, 2, 3]
    assert torch.equal(after[unaffected], before[unaffected])
    assert not torch.equal(after[1], before[1])


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("case", CASES)
def test_cpp_float64_agrees_with_the_reference(backend, case):
    """The engine's float64 parity tests run on the C++ attention: it must agree to rounding."""
    *shape, tree = CASES[case]
    batch = make_batch(*shape, dtype=torch.float64, tree=tree, contiguous=True, gen=torch.Generator().manual_seed(1))
    expected = ops.paged_attention(*batch, backend="reference")
    torch.testing.assert_close(ops.paged_attention(*batch, backend="cpp"), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize(
    "name, change, error",
    [("query", lambda a: a.update(query=a["query"].long()), TypeError),
     ("key_cache", lambda a: a.update(key_cache=a["key_cache"][..., :8]), ValueError),
     ("value_cache", lambda a: a.update(value_cache=a["value_cache"].double()), TypeError),
     ("block_tables", lambda a: a.update(block_tables=a["block_tables"].int()), TypeError),
     ("block_tables", lambda a: a["block_tables"].fill_(10**6), ValueError),
     ("seq_lens", lambda a: a["seq_lens"].fill_(10**6), ValueError),
     ("query_start_loc", lambda a: a["query_start_loc"].fill_(0), ValueError),
     ("tree_mask", lambda a: a.update(tree_mask=a["tree_mask"][:, :2]), ValueError)],
)
def test_cpp_checks_its_inputs(backend, name, change, error):
    """Bad shapes and dtypes, and metadata that would read outside the pool, raise an error naming the
    argument before any work: never a crash."""
    names = ("query", "key_cache", "value_cache", "block_tables", "seq_lens", "query_start_loc", "tree_mask")
    batch = make_batch([12, 9], [4, 3], 2, 1, 16, 4, torch.float32, True, True, torch.Generator().manual_seed(2))
    args = dict(zip(names, (t.long() if t.dtype == torch.int32 else t for t in batch)))
    change(args)
    with pytest.raises(error, match=name):
        ops._cpp().paged_attention(**args, scale=None)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES, ids=["fp32", "fp16", "bf16"])
def test_fresh_prompts_attend_causally_over_their_own_keys(dtype, atol, rtol):
    """A prefill of prompts (no keys cached before the new ones): the "fresh" plan reads this forward's K/V, one
    causal attention per sequence, as the paged reference reads them from the pools."""
    gen = torch.Generator().manual_seed(7)
    lens = [9, 30, 1, 17]
    query, key_cache, value_cache, tables, seq_lens, starts, _ = make_batch(
        lens, lens, 4, 2, 16, 5, dtype=dtype, tree=False, contiguous=True, gen=gen)
    pos = torch.cat([torch.arange(n) for n in lens])
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    blocks, slots = tables[seq, pos // 5].long(), pos % 5
    key, value = key_cache[blocks, slots], value_cache[blocks, slots]  # [T, Hkv, D]: the new tokens' own
    plan = ops.plan_attention(tables, seq_lens, starts, None, 5, backend="reference", fresh=True)
    assert plan[0] == "fresh"
    out = ops.attend(query, key_cache, value_cache, plan, None, key, value)
    expected = ops.paged_attention(*as_float64((query, key_cache, value_cache, tables, seq_lens, starts, None)),
                                   backend="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    # a tree's new tokens are not causal: the paged reference attends them
    mask = torch.ones(len(pos), max(lens), dtype=torch.bool)
    assert ops.plan_attention(tables, seq_lens, starts, mask, 5, backend="reference", fresh=True)[0] == "reference"
