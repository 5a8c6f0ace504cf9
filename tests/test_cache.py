"""Paged KV cache: allocation, fork with shared blocks, copy on write, release."""
import pytest
import torch

from specbeam.cache import BlockTable, CacheFullError, PagedKVCache


def _cache(num_blocks=8, block_size=4):
    cache = PagedKVCache(2, num_blocks, block_size, 1, 2, dtype=torch.float32, device="cpu")
    cache.pool.zero_()
    return cache


def _write(cache, table, values):
    slots = cache.reserve(table, len(values))
    cache.flush()  # the copies on write, before anything is written
    for slot, value in zip(slots, values):
        cache.pool.view(2, 2, -1, 1, 2)[:, :, slot] = value


def _read(cache, table):
    return [float(cache.pool.view(2, 2, -1, 1, 2)[0, 0, t.item(), 0, 0]) for t in _slots(cache, table)]


def _slots(cache, table):
    return torch.tensor([table.blocks[p // cache.block_size] * cache.block_size + p % cache.block_size
                         for p in range(table.length)])


def test_fork_shares_blocks_and_copy_on_write_keeps_the_parent_intact():
    cache = _cache()
    parent = BlockTable()
    _write(cache, parent, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # one full block, one half block
    child = cache.fork(parent)
    assert child.blocks == parent.blocks and cache.allocator.num_free == 6
    _write(cache, child, [7.0])  # writes into the shared half block: copied first
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    assert _read(cache, parent) == [1, 2, 3, 4, 5, 6] and _read(cache, child) == [1, 2, 3, 4, 5, 6, 7]
    _write(cache, parent, [8.0])  # the parent's half block is now its own: written in place
    assert _read(cache, parent) == [1, 2, 3, 4, 5, 6, 8] and cache.allocator.num_free == 5


def test_a_borrowing_fork_holds_only_the_block_it_writes():
    """fork(borrow=True): the full blocks stay the parent's alone (their counts unchanged), the half block is
    shared and copied on write as by any fork; released before or after the parent, every block comes back."""
    for child_first in (True, False):
        cache = _cache()
        parent = BlockTable()
        _write(cache, parent, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # one full block, one half block
        child = cache.fork(parent, borrow=True)
        refcount = cache.allocator.refcount
        assert child.blocks == parent.blocks and child.borrowed == 1
        assert refcount[parent.blocks[0]] == 1 and refcount[parent.blocks[1]] == 2
        _write(cache, child, [7.0, 8.0, 9.0])  # copies the half block, then a block of its own
        assert _read(cache, parent) == [1, 2, 3, 4, 5, 6] and _read(cache, child) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
        grandchild = cache.fork(child)  # an ordinary fork holds every block, the borrowed ones too
        assert refcount[parent.blocks[0]] == 2 and grandchild.borrowed == 0
        cache.truncate(child, 3)  # below what it borrowed: nothing of the parent's is released
        assert child.blocks == parent.blocks[:1] and child.borrowed == 1 and refcount[parent.blocks[0]] == 2
        for table in ((child, parent, grandchild) if child_first else (parent, grandchild, child)):
            cache.release(table)
        assert cache.allocator.num_free == cache.allocator.num_blocks


def test_release_and_truncate_return_every_block():
    cache = _cache()
    table = BlockTable()
    _write(cache, table, [float(i) for i in range(10)])
    forked = cache.fork(table)
    cache.truncate(table, 5)
    assert len(table.blocks) == 2 and table.length == 5
    cache.release(table)
    cache.release(forked)
    assert cache.allocator.num_free == cache.allocator.num_blocks


def test_running_out_of_blocks_raises():
    cache = _cache(num_blocks=2)
    with pytest.raises(CacheFullError):
        cache.reserve(BlockTable(), 9)
