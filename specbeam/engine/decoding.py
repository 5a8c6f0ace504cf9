"""A request's decoding state, which the core advances one round at a time: its rows (sequences) in the
target's paged cache, their prefill, its draft session, and the round protocol every mode follows:

    choose_depth() -> blocks_needed() -> plan() -> [one target forward shared with other requests] -> absorb()

`plan` is a generator that yields the draft passes it needs before it returns its works, so that the core runs
every request's draft passes of one depth as one draft forward.

A row's last token is its root: not in the cache yet, it is fed with the row's draft tree (a tree of the root
alone is a plain decoding step). Preemption drops a request's blocks and keeps its tokens; the next prefill
recomputes their K/V."""
from dataclasses import dataclass
from typing import Callable

import torch

from specbeam import ops
from specbeam.cache import BlockTable, PagedKVCache
from specbeam.config import SpecConfig
from specbeam.depth_policy import DepthPolicy
from specbeam.model_runner import Work
from specbeam.request import Request
from specbeam.stats import DecodeStats
from specbeam.tree import DraftTree


@dataclass
class Row:
    """One sequence: its K/V (`table`) and every token so far, left padding included; tokens[-1] is the root."""

    tokens: list[int]
    pad: int
    table: BlockTable | None = None  # None: released (finished, or its prompt's search ended)


class Decoding:
    """What every mode shares. Subclasses build `self.rows` in `after_prefill` and define plan / absorb."""

    def __init__(self, request: Request, cache: PagedKVCache, drafter, spec: SpecConfig,
                 policies: Callable[[int], DepthPolicy] | None, streamer=None,
                 generator: torch.Generator | None = None):
        """policies: the depth policy for a load (rows of the other running requests); None: a fixed depth."""
        self.request, self.cache, self.drafter, self.spec = request, cache, drafter, spec
        self.policies, self.streamer, self.generator = policies, streamer, generator
        self.policy: DepthPolicy | None = None  # the one that chose this round's depth
        self.params = request.params
        self.stats = DecodeStats()
        self.rows: list[Row] | None = None  # None until the prompts are prefilled
        self.num_rows = num_rows = request.input_ids.shape[0]
        self.pads = [request.input_ids.shape[1] - len(p) for p in request.prompts for _ in
                     range(self.params.rows_per_prompt)]
        self.draft = drafter.session(num_rows) if drafter is not None else None
        self.prompt_tables: list[BlockTable] = []
        self.depth = 0
        self.finished = False
        self.needs_prefill = True  # the prompts, or after a preemption every live row's tokens

    # --- prefill ----------------------------------------------------------------------------------------

    def prefill_works(self) -> list[Work]:
        """K/V of every token before each root: the prompts (shared by their rows), or after a preemption
        each live row's own tokens."""
        if self.rows is None:
            self.prompt_tables = [BlockTable() for _ in self.request.prompts]
            return [Work(t, p[:-1].tolist(), 0) for t, p in zip(self.prompt_tables, self.request.prompts) if len(p) > 1]
        return [Work(row.table, row.tokens[row.pad:-1], 0) for row in self.live_rows() if len(row.tokens) - row.pad > 1]

    def prefill_blocks(self) -> int:
        """Blocks the prefill takes (an upper bound)."""
        size = self.cache.block_size
        if self.rows is None:
            return sum(-(-len(p) // size) + 1 for p in self.request.prompts)
        return sum(-(-len(r.tokens) // size) + 1 for r in self.live_rows())

    def after_prefill(self) -> None:
        """The first time: every row forks its prompt's table."""
        self.needs_prefill = False
        if self.rows is not None:
            return
        rows_per_prompt, padded = self.params.rows_per_prompt, self.request.input_ids.tolist()
        self.rows = [Row(padded[r], self.pads[r], self.cache.fork(self.prompt_tables[r // rows_per_prompt]))
                     for r in range(len(padded))]
        for table in self.prompt_tables:
            self.cache.release(table)
        self.prompt_tables = []

    # --- blocks -----------------------------------------------------------------------------------------

    def live_rows(self) -> list[Row]:
        """Rows still decoding (a finished row, or a row of a prompt whose search ended, has no table)."""
        return [r for r in self.rows if r.table is not None]

    def release_row(self, row: Row) -> None:
        if row.table is not None:
            self.cache.release(row.table)
            row.table = None

    def preempt(self) -> None:
        """Give every block back and keep the tokens: the next prefill recomputes their K/V."""
        self.release()
        self.needs_prefill = True

    def release(self) -> None:
        """Free every block this request holds, in the target's cache and the draft's."""
        for table in self.prompt_tables:
            self.cache.release(table)
        self.prompt_tables = []
        for row in self.rows or []:
            if row.table is not None:
                self.cache.release(row.table)
                row.table = BlockTable()
        if self.draft is not None:
            self.draft.end()

    def tables(self) -> list[BlockTable]:
        return self.prompt_tables + [r.table for r in self.rows or [] if r.table is not None]

    def blocks_needed(self) -> tuple[int, int]:
        """(target, draft) blocks the next round may take at most: its tree's slots (and, under beam search,
        the copies its new beams make), each with a block for copy on write."""
        nodes = self.spec.max_nodes if self.depth > 0 else 1
        per_row = (-(-nodes // self.cache.block_size) + 1) * (2 if self.params.num_beams > 1 else 1)
        ids = self.request.input_ids
        lengths = [len(r.tokens) for r in self.live_rows()] if self.rows else [ids.shape[1]] * ids.shape[0]
        draft = 0 if self.depth == 0 else self.drafter.blocks_needed(lengths, nodes)
        return per_row * len(lengths), draft

    # --- rounds -----------------------------------------------------------------------------------------

    def choose_depth(self, load: int) -> None:
        """This round's draft depth, with `load` rows of other requests in the same forwards."""
        if self.draft is None:
            self.depth = 0
        elif self.policies is None:
            self.depth = self.spec.depth
        else:
            self.policy = self.policies(load)
            self.depth = self.policy.choose()

    def plan(self):  # a generator -> list[Work]
        """This round's works: each row's root and draft tree. Yields the draft passes it needs first."""
        raise NotImplementedError

    def absorb(self, logits: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def record_round(self, steps_before: int, seconds: float) -> None:
        """Tell the depth policy how many steps this round advanced in how long."""
        if self.policy is not None:
            self.policy.record(self.depth, self.stats.steps - steps_before, seconds)

    def propose(self, rows: list[int], depths: list[int], beams=None):  # a generator -> list[DraftTree]
        """Draft trees under `rows` (root-only where the depth is 0 or there is no draft); yields the draft
        passes it needs (see `specbeam.drafters`)."""
        padded = [self.rows[r].tokens for r in rows]
        if self.draft is None or max(depths, default=0) == 0:
            return [DraftTree.root_only(p[-1]) for p in padded]
        mode = self.params.mode
        trees = yield from self.draft.propose(
            rows, padded, [self.pads[r] for r in rows], self.request.logits_processor, self.spec, depths,
            log_softmax=mode == "beam", generator=self.generator,
            sample=self.sampling_probs if mode == "sample" else None,
            exclude=self.request.config._eos_token_tensor if mode == "beam" else None, beams=beams,
        )
        self.stats.drafted_tokens += sum(len(t) - 1 for t in trees)
        self.stats.draft_passes = self.draft.passes
        return trees

    def sampling_probs(self, scores: torch.Tensor) -> torch.Tensor:  # [rows, vocab] processed -> probabilities
        """The distribution sampling draws from: the fused temperature / top-k / top-p / min-p filter, or a
        softmax where transformers' own warpers are among the processors."""
        if self.params.warpers is None:
            return scores.softmax(dim=-1)
        temperature, top_k, top_p, min_p = self.params.warpers
        return ops.filter_probs(scores, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)

    def count_accepted(self, depth: int) -> None:
        self.stats.rounds += 1
        while len(self.stats.accepted_by_depth) < depth:
            self.stats.accepted_by_depth.append(0)
        for d in range(depth):
            self.stats.accepted_by_depth[d] += 1

    def history(self, scores: list):
        """What stopping criteria get as `scores`: the processed scores so far when the caller keeps them
        (output_scores), else None, as transformers passes them."""
        return tuple(scores) if self.request.config.output_scores else None

    # --- output -----------------------------------------------------------------------------------------

    def take_new_tokens(self) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Per row, the tokens committed since the last call (and their raw logits when output_logits)."""
        raise NotImplementedError

    def result(self):
        """What `generate` returns for this request."""
        raise NotImplementedError


def tree_work(table: BlockTable, tree: DraftTree) -> Work:
    """A row's round: its root and tree nodes, all scored."""
    mask = tree.ancestor_mask() if len(tree) > 1 else None
    return Work(table, tree.tokens, len(tree), tree.depths() if len(tree) > 1 else None, mask)
