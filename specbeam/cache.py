"""Paged KV cache: a block pool per model, an allocator with reference counts, and block tables that fork
and copy on write, so that the beams of one prompt share the prompt's blocks."""
from dataclasses import dataclass, field

import numpy as np
import torch

from specbeam.host import as_tensor


class CacheFullError(RuntimeError):
    """The pool ran out of blocks (the scheduler reserves every round's blocks first: a bug, not bad input)."""


class BlockAllocator:
    """Free list plus a reference count per block. A block is free exactly when its count is 0."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise CacheFullError(f"all {self.num_blocks} KV blocks are in use")
        block = self.free.pop()
        self.refcount[block] = 1
        self.peak_used = max(self.peak_used, self.num_blocks - len(self.free))
        return block

    def decref(self, blocks: list[int]) -> None:
        """One holder fewer for each of `blocks`; a block nobody holds is free."""
        refcount, free = self.refcount, self.free
        for block in blocks:
            refcount[block] -= 1
            if not refcount[block]:
                free.append(block)


@dataclass
class BlockTable:
    """One sequence's blocks; `length` is the number of positions whose K/V are stored. The first `borrowed`
    blocks are held by the table it was forked from (`fork(..., borrow=True)`), not by this one."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    borrowed: int = 0


class PagedKVCache:
    """K and V pools of one model: `pool[layer, 0 | 1]` is `[num_blocks, block_size, num_kv_heads, head_dim]`."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        # zeroed, so that no slot ever holds a nan: masked-out keys get weight 0, and 0 * nan would not be 0;
        # an ordinary tensor even when made in inference mode, since the engine's thread writes it
        with torch.inference_mode(False):
            self.pool = _zeros(shape, dtype, torch.device(device))
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.pending: list[tuple[int, int]] = []  # copies on write not done yet: (source block, new block)
        # views made once: per layer, K and V as blocks [num_blocks, block_size, Hkv, D] and as slots
        self.layers = [(self.pool[i, 0], self.pool[i, 1]) for i in range(num_layers)]
        self.slots = [(k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])) for k, v in self.layers]
        # one block, all layers, K and V
        self.block_bytes = int(np.prod(shape[:2] + shape[3:])) * self.pool.element_size()

    def fork(self, table: BlockTable, borrow: bool = False) -> BlockTable:
        """A new table sharing every block of `table`. borrow: its full blocks, which the new table only reads,
        are held by `table` alone (which must outlive it: a draft tree's node forked from its parent, both
        released at the round's end); the new table holds only the block it writes next."""
        refcount, blocks = self.allocator.refcount, table.blocks
        borrowed = min(table.length // self.block_size, len(blocks)) if borrow else 0
        for block in blocks[borrowed:]:
            refcount[block] += 1
        return BlockTable(blocks.copy(), table.length, borrowed)

    def continue_tables(self, sources: list[BlockTable], old: list[BlockTable]) -> list[BlockTable]:
        """One table per new row, continuing its source: a table of `old` is taken over by its first
        continuation and forked for the others (as is any other source, which outlives the call); the tables of
        `old` that nothing continues are released."""
        mine, taken, new = {id(t) for t in old}, set(), []
        for source in sources:
            if id(source) in mine and id(source) not in taken:
                taken.add(id(source))
                new.append(source)
            else:
                new.append(self.fork(source))
        for table in old:  # (after every fork: a source may borrow blocks from a table released here)
            if id(table) not in taken:
                self.release(table)
        return new

    def zero(self, tables: list[BlockTable]) -> None:
        """Zero the blocks of `tables` (a forward that wrote non-finite K/V there must leave none behind)."""
        blocks = sorted({b for t in tables for b in t.blocks})
        if blocks:
            self.pool[:, :, as_tensor(blocks, self.pool.device)] = 0

    def release(self, table: BlockTable) -> None:
        self.allocator.decref(table.blocks[table.borrowed:])
        table.blocks, table.length, table.borrowed = [], 0, 0

    def reserve(self, table: BlockTable, num_tokens: int) -> list[int]:
        """Slots for the next `num_tokens` positions of `table`, made private first: a missing block is
        allocated, a shared one about to be written copied (copy on write, done by the next `flush`, before
        anything is written). Returns flat slot indices."""
        start, end = table.length, table.length + num_tokens
        while len(table.blocks) * self.block_size < end:
            table.blocks.append(self.allocator.allocate())
        self._make_private(table, start, end - 1)
        table.length = end
        blocks, size = table.blocks, self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, end)]  # (`_slot`, inlined: per token)

    def keep_paths(self, kept: list[tuple[BlockTable, int, list[int]]]) -> None:
        """After a tree pass, each (table, start, nodes) keeps only a root path: the tree's node i sits at
        position start + i, and the path's node at depth d moves to start + d. Every move reads its source before
        any is written (one gather, one scatter over all tables), so their order does not matter; a destination
        is made private first, so no other table sees it change. Then the rest of each tree goes."""
        moves = [[(start + node, start + depth) for depth, node in enumerate(nodes) if node != depth]
                 if len(nodes) > 1 else [] for _, start, nodes in kept]  # (a root alone stays where it is)
        for (table, _, _), mine in zip(kept, moves):
            if mine:
                self._make_private(table, min(dst for _, dst in mine), max(dst for _, dst in mine))
        slots = [[self._slot(table, s), self._slot(table, d)] for (table, _, _), mine in zip(kept, moves)
                 for s, d in mine]
        if slots:
            self.flush()
            src, dst = as_tensor(slots, self.pool.device).unbind(1)
            flat = self.pool.view(*self.pool.shape[:2], -1, *self.pool.shape[4:])  # [layers, 2, slots, Hkv, D]
            flat.index_copy_(2, dst, flat.index_select(2, src))
        for table, start, nodes in kept:
            if table.length > start + len(nodes):
                self.truncate(table, start + len(nodes))

    def _slot(self, table: BlockTable, position: int) -> int:
        return table.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def _make_private(self, table: BlockTable, first: int, last: int) -> None:
        """Copy every shared block holding a position in [first, last]."""
        refcount, blocks = self.allocator.refcount, table.blocks
        for index in range(first // self.block_size, last // self.block_size + 1):
            if refcount[blocks[index]] > 1:
                blocks[index] = self._copy_block(blocks[index])

    def truncate(self, table: BlockTable, length: int) -> None:
        """Forget positions >= length, releasing blocks that no longer hold any."""
        keep = -(-length // self.block_size)
        self.allocator.decref(table.blocks[max(keep, table.borrowed):])
        del table.blocks[keep:]
        table.length, table.borrowed = length, min(table.borrowed, keep)

    def _copy_block(self, block: int) -> int:
        """A private copy of a shared block (its source keeps another holder until the copy is flushed)."""
        new = self.allocator.allocate()
        self.pending.append((block, new))
        self.allocator.decref([block])
        return new

    def flush(self) -> None:
        """Do the pending copies on write, all in one indexed copy."""
        if self.pending:
            source, new = as_tensor(self.pending, self.pool.device).unbind(1)
            self.pool.index_copy_(2, new, self.pool.index_select(2, source))
            self.pending = []


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed pool. On the CPU it comes from calloc, whose pages the OS maps in only when first written: a
    pool sized for a generous memory budget costs only what is used."""
    if device.type != "cpu" or 0 in shape:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
