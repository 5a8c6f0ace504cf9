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
        load = sum(state.round_tokens for state in self.running)  # tokens the last round fed
        for state in self.running:
            state.choose_shape(load - state.round_tokens)
        needs = {state: self._need(state) for state in self.running}
        total = _total(needs.values())
        if not _fits(total):  # a plain step for everyone before anyone is preempted
            for state in self.running:
                state.plain_step()
            needs = {state: self._need(state) for state in self.running}
            total = _total(needs.values())
        while self.running and not _fits(total):
            victim = self.running.pop()
            _add(total, needs.pop(victim), -1)
            if not self.running:
                failures.append((victim, too_large(victim, self.cache)))
                break
            victim.preempt()
            self.waiting.appendleft(victim)
            self.preemptions += 1
        # a request admitted now shares its first round with the running ones and with those admitted after it: its
        # tree is sized beside them all (else a burst of arrivals would each draft as if alone)
        waiting_rows = sum(state.num_rows for state in self.waiting)
        while self.waiting and (not self.running or _rows(self.running + [self.waiting[0]]) <= self.max_num_seqs):
            state = self.waiting[0]
            waiting_rows -= state.num_rows
            state.choose_shape(sum(s.round_tokens for s in self.running) + waiting_rows)
            need = self._need(state)
            if not _fits(total, need):
                state.plain_step()  # a plain first step, if only that fits
                need = self._need(state)
            if _fits(total, need):
                self.running.append(self.waiting.popleft())
                _add(total, need)
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

    def _need(self, state: Decoding) -> dict:
        """Blocks per pool (the target's, the draft's) that one round of `state`, and its prefill, may take."""
        target, draft = state.blocks_needed()
        need = dict(draft)
        need[self.cache] = need.get(self.cache, 0) + target + (state.prefill_blocks() if state.needs_prefill else 0)
        return need


def _add(total: dict, need: dict, sign: int = 1) -> None:
    """total += sign * need, per pool."""
    for cache, blocks in need.items():
        total[cache] = total.get(cache, 0) + sign * blocks


def _total(needs) -> dict:
    total = {}
    for need in needs:
        _add(total, need)
    return total


def _fits(*needs: dict) -> bool:
    """Whether the blocks `needs` take together from each pool are free in it."""
    pools = {cache for need in needs for cache in need}
    return all(sum(need.get(cache, 0) for need in needs) <= cache.allocator.num_free for cache in pools)


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
