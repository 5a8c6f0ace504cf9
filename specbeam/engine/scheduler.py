"""Which requests run this step. First come, first served: running requests go on while their next round's
blocks fit in the pool; when they do not, the youngest running request is preempted (its blocks are freed, its
tokens kept; it waits at the head of the queue and its K/V are recomputed when it is admitted again). Then
waiting requests are admitted in order while their prefill and first round fit. A request never fails because
another one holds the memory: only a request that cannot fit in the whole pool on its own does."""
from collections import deque

from specbeam.cache import PagedKVCache
from specbeam.engine.decoding import Decoding


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_num_seqs: int):
        self.cache, self.max_num_seqs = cache, max_num_seqs
        self.waiting: deque[Decoding] = deque()
        self.running: list[Decoding] = []
        self.preemptions = 0

    def schedule(self) -> list[tuple[Decoding, Exception]]:
        """Fill `running` for this step; returns the requests that cannot run even alone, with their error."""
        failures = []
        rows = _rows(self.running)
        for state in self.running:
            state.choose_depth(rows - state.num_rows)
        if not self._fits(self.running):  # a plain step for everyone before anyone is preempted
            for state in self.running:
                state.plain_step()
        while self.running and not self._fits(self.running):
            victim = self.running.pop()
            if not self.running:
                failures.append((victim, too_large(victim, self.cache)))
                break
            victim.preempt()
            self.waiting.appendleft(victim)
            self.preemptions += 1
        while self.waiting and (not self.running or _rows(self.running + [self.waiting[0]]) <= self.max_num_seqs):
            state = self.waiting[0]
            state.choose_depth(_rows(self.running))
            if not self._fits(self.running + [state]):
                state.plain_step()  # a plain first step, if only that fits
            if self._fits(self.running + [state]):
                self.running.append(self.waiting.popleft())
            elif not self.running:
                failures.append((self.waiting.popleft(), too_large(state, self.cache)))
            else:
                break
        return failures

    def remove(self, state: Decoding) -> None:
        if state in self.running:
            self.running.remove(state)
        elif state in self.waiting:
            self.waiting.remove(state)

    def _fits(self, states: list[Decoding]) -> bool:
        """Whether one round of `states` (and the prefills they need) fits in the free blocks of every pool."""
        target = sum(s.blocks_needed()[0] + (s.prefill_blocks() if s.needs_prefill else 0) for s in states)
        if target > self.cache.allocator.num_free:
            return False
        drafts = {}
        for s in states:
            if s.draft is not None and s.depth > 0:
                drafts.setdefault(id(s.drafter), [s.drafter, 0])[1] += s.blocks_needed()[1]
        return all(needed <= drafter.cache.allocator.num_free for drafter, needed in drafts.values() if needed)


def _rows(states: list[Decoding]) -> int:
    return sum(s.num_rows for s in states)


def _longest(state: Decoding) -> int:
    if state.rows:
        return max(len(r.tokens) - r.pad for r in state.rows)
    return max(len(p) for p in state.request.prompts)


def too_large(state: Decoding, cache: PagedKVCache) -> ValueError:
    params, size = state.params, cache.block_size
    return ValueError(
        f"this request alone needs more KV blocks than the whole pool holds ({cache.allocator.num_blocks} blocks of "
        f"{size} tokens, {cache.allocator.num_blocks * cache.block_bytes / 2**20:.1f} MiB; EngineConfig."
        f"max_cache_bytes sets it): it holds {_longest(state)} tokens of max_length {params.max_length}; lower "
        f"max_new_tokens, num_beams or the batch, or shorten the prompt"
    )
