"""A request's decoding state, which the core advances one round at a time: its rows (sequences) in the
target's paged cache, their prefill, its draft session, and the round protocol every mode follows:

    choose_shape() -> blocks_needed() -> plan() -> [one target forward shared with other requests]
        -> [selection, with the other requests of its kind: `tokens.absorb_tokens`, `beams.absorb_beams`]

`plan` is a generator that yields the draft passes it needs before it returns its works, so that the core runs
every request's draft passes of one depth as one draft forward.

A row's last token is its root: not in the cache yet, it is fed with the row's draft tree (a tree of the root
alone is a plain decoding step). Preemption drops a request's blocks and keeps its tokens; the next prefill
recomputes their K/V."""
from dataclasses import dataclass, replace

import torch

from specbeam import ops
from specbeam.cache import BlockTable, PagedKVCache
from specbeam.config import BEAM, SAMPLE, SpecConfig
from specbeam.model_runner import Work
from specbeam.request import Request
from specbeam.stats import DecodeStats
from specbeam.tree import DraftTree
from specbeam.tree_policy import TreePolicy

PLAIN_ROUNDS_TOLD = 16  # plain rounds told to the tree policy at once


@dataclass(eq=False)
class Row:
    """One sequence: its K/V (`table`) and every token so far, left padding included; tokens[-1] is the root."""

    index: int  # in the request: prompt * rows_per_prompt + its beam or sample
    tokens: list[int]
    pad: int
    table: BlockTable | None = None  # None: released (finished, or its prompt's search ended)


class Decoding:
    """What every mode shares. Subclasses build `self.rows` in `after_prefill`, define `plan`, and the selection
    that takes their logits."""

    def __init__(self, request: Request, cache: PagedKVCache, drafter, spec: SpecConfig,
                 policy: TreePolicy | None, streamer=None, generator: torch.Generator | None = None):
        """policy: sizes each round's draft tree; None: the tree of `spec` (its depth and width) every round."""
        self.request, self.cache, self.drafter, self.spec = request, cache, drafter, spec
        self.policy, self.streamer, self.generator = policy, streamer, generator
        self.params = request.params
        self.stats = DecodeStats()
        self.rows: list[Row] | None = None  # None until the prompts are prefilled
        self.num_rows = num_rows = request.input_ids.shape[0]
        self.pads = [request.input_ids.shape[1] - len(p) for p in request.prompts for _ in
                     range(self.params.rows_per_prompt)]
        self.draft = drafter.session(num_rows) if drafter is not None else None
        self.prompt_tables: list[BlockTable] = []
        self.depth, self.width = 0, spec.width  # this round's tree
        self.round_tokens = 0  # tokens this round feeds the target
        self.chosen_for = (num_rows, 0)  # (trees, load) this round's shape was chosen for
        self.plain_left = 0  # plain rounds the policy's last choice still holds for
        self.stages: list = []  # under a cascade's policy: [the stages taking part]; else every stage
        self.advanced = 0  # tokens this round committed (beam search: steps, summed over prompts)
        self.seen: list[tuple[int, int | None, int]] = []  # this round's acceptance, for the tree policy
        self.untold: tuple | None = None  # plain rounds not told to the tree policy yet: (rounds, tokens, seconds,
        # their width, their stages)
        self.finished = False
        self.needs_prefill = True  # the prompts, or after a preemption every live row's tokens
        self.forked = False  # during a prefill: the rows have forked their prompts' tables

    # --- prefill ----------------------------------------------------------------------------------------

    def prefill_works(self) -> list[Work]:
        """K/V of every token before each root, in up to two forwards: first each prompt once (its rows share
        it), then, after a preemption, each live row's own tokens past its prompt."""
        if not self.forked:
            prompts = self._prompts_to_prefill()
            self.prompt_tables = [BlockTable() if p in prompts else None for p in range(len(self.request.prompts))]
            return [Work(t, p[:-1].tolist(), 0) for t, p in zip(self.prompt_tables, self.request.prompts)
                    if t is not None and len(p) > 1]
        return [Work(row.table, row.tokens[row.pad + len(prompt) - 1:-1], 0)
                for row, prompt in self._live_with_prompts() if len(row.tokens) - row.pad > len(prompt)]

    def after_prefill(self) -> None:
        """After the prompts, every live row forks its prompt's table; its own tokens, if any, come next."""
        if not self.forked:
            if self.rows is None:
                padded = self.request.input_ids.tolist()
                self.rows = [Row(r, padded[r], self.pads[r], BlockTable()) for r in range(len(padded))]
            for row, prompt in self._live_with_prompts():
                row.table = self.cache.fork(self.prompt_tables[self._prompt_of(row)])
            self.forked = True
            if any(len(row.tokens) - row.pad > len(prompt) for row, prompt in self._live_with_prompts()):
                return
        for table in self.prompt_tables:
            if table is not None:
                self.cache.release(table)
        self.prompt_tables, self.forked, self.needs_prefill = [], False, False

    def _prompts_to_prefill(self) -> set[int]:
        if self.rows is None:
            return set(range(len(self.request.prompts)))
        return {self._prompt_of(r) for r in self.live_rows()}

    def _prompt_of(self, row: "Row") -> int:
        return row.index // self.params.rows_per_prompt

    def _live_with_prompts(self) -> list[tuple["Row", torch.Tensor]]:
        return [(r, self.request.prompts[self._prompt_of(r)]) for r in self.live_rows()]

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
        self.release()  # live rows keep their tables, emptied
        self.needs_prefill = True

    def release(self) -> None:
        """Free every block this request holds, in the target's cache and the draft's (live rows keep an
        empty table)."""
        for table in self.prompt_tables:
            if table is not None:
                self.cache.release(table)
        self.prompt_tables = []
        for row in self.rows or []:
            if row.table is not None:
                self.cache.release(row.table)  # the row stays live: its table is empty, not gone
        if self.draft is not None:
            self.draft.end()

    def tables(self) -> list[BlockTable]:
        rows = [r.table for r in self.live_rows()] if self.rows else []
        return [t for t in self.prompt_tables if t is not None] + rows

    def blocks_needed(self) -> tuple[int, dict]:
        """Target blocks, and draft blocks per draft pool, that the next round may take at most: per row, the
        blocks its tree's slots reach past its table, a copy on write of a shared last block, and under beam search
        with a tree the copies its new beams' paths may make."""
        nodes = self.round_spec.max_nodes if self.depth > 0 else 1
        rows = self.live_rows() if self.rows else [Row(r, t, pad) for r, (t, pad) in
                                                    enumerate(zip(self.request.input_ids.tolist(), self.pads))]
        target = sum(self._row_blocks(row, nodes) for row in rows)
        if self.params.num_beams > 1 and self.depth > 0:
            target += len(rows) * (-(-nodes // self.cache.block_size) + 1)
        draft = {} if self.depth == 0 else self.drafter.blocks_needed([len(r.tokens) for r in rows], nodes)
        return target, draft

    def _row_blocks(self, row: Row, nodes: int) -> int:
        """Blocks a row's round takes: those its slots reach past its table, and the copy of a shared last
        block. A row not prefilled yet will hold every token before its root, its prompt's blocks shared."""
        size, table = self.cache.block_size, row.table
        if table is not None and table.blocks:
            length, shared = table.length, self.cache.allocator.refcount[table.blocks[-1]] > 1
        else:
            length = len(row.tokens) - row.pad - 1
            own = length >= len(self.request.prompts[row.index // self.params.rows_per_prompt])
            shared = not own and self.params.rows_per_prompt > 1
        grown = -(-(length + nodes) // size) - -(-length // size)
        return grown + bool(length % size and shared)

    def prefill_blocks(self) -> int:
        """Blocks the prefill takes: each prompt once, then each row's own tokens past it (its copy of the
        prompt's last, shared block included)."""
        size = self.cache.block_size
        prompts = sum(-(-(len(self.request.prompts[p]) - 1) // size) for p in self._prompts_to_prefill())
        rows = 0
        for row, prompt in (self._live_with_prompts() if self.rows else []):
            shared_length, length = len(prompt) - 1, len(row.tokens) - row.pad - 1
            if length > shared_length:
                rows += -(-length // size) - -(-shared_length // size) + bool(shared_length % size)
        return prompts + rows

    # --- rounds -----------------------------------------------------------------------------------------

    def choose_shape(self, load: int) -> None:
        """This round's tree, beside `load` tokens of other requests in the same forward."""
        if self.draft is None:
            self.depth = 0
        elif self.policy is None:
            self.depth, self.width = self.spec.depth, self.spec.width
        elif self.plain_left and not self.depth:  # a choice of plain steps holds for the policy's `hold` rounds
            self.plain_left -= 1
            self.chosen_for = (self.chosen_for[0], load)
        else:  # a cascade's policy also says which of its stages take part
            self.chosen_for = (self.num_trees(), load)
            current = (self.depth, self.width, *self.stages) if self.rows else None
            self.depth, self.width, *self.stages = self.policy.choose(*self.chosen_for, current=current,
                                                                      behind=self._behind)
            self.plain_left = self.policy.hold - 1 if not self.depth and self.policy.holds else 0

    def _behind(self) -> int:
        """Tokens the draft would catch up on before a drafting round (asked only when one is considered): before
        the prefill, every row's prompt."""
        if self.rows is None:
            return sum(len(self.request.prompts[r // self.params.rows_per_prompt]) - 1 for r in range(self.num_rows))
        live = self.live_rows()
        return self.draft.behind([r.index for r in live], [len(r.tokens) - r.pad for r in live])

    def num_trees(self) -> int:
        """The trees a round drafts: one per live row (beam search: per running prompt)."""
        return len(self.live_rows()) if self.rows else self.num_rows

    @property
    def round_spec(self) -> SpecConfig:
        return replace(self.spec, width=self.width) if self.width != self.spec.width else self.spec

    def plain_step(self) -> None:
        """Make this round a plain step, to save blocks, unless the draws depend on the trees' shapes (a sampling
        request at a fixed depth: seeded, its draws must not depend on what runs beside it)."""
        if self.params.mode != SAMPLE or self.policy is not None:
            self.depth = 0

    def report_round(self, seconds: float) -> None:
        """Tell the tree policy what this round advanced in its share of the round's `seconds`, and accepted.
        Plain rounds are told PLAIN_ROUNDS_TOLD at a time (or sooner, when a drafting round or the end comes):
        the policy's bookkeeping is most of what it adds to a plain step."""
        if self.policy is None:
            return
        if not self.depth:
            rounds, tokens, total, *_ = self.untold or (0, 0, 0.0)
            self.untold = (rounds + 1, tokens + self.advanced, total + seconds, self.width, self.stages)
            if rounds + 1 < PLAIN_ROUNDS_TOLD and not self.finished:
                return
        if self.untold:
            rounds, tokens, total, width, stages = self.untold
            self.policy.observe(0, width, *self.chosen_for, tokens, total, [], 0, *stages, rounds=rounds)
            self.untold = None
        if self.depth:
            self.policy.observe(self.depth, self.width, *self.chosen_for, self.advanced, seconds, self.seen,
                                self.draft.caught_up, *self.stages)

    def plan(self):  # a generator -> list[Work]
        """This round's works: each row's root and draft tree. Yields the draft passes it needs first."""
        raise NotImplementedError

    def propose(self, rows: list[int], depths: list[int], beams=None):  # a generator -> list[DraftTree]
        """Draft trees under `rows` (root-only where the depth is 0 or there is no draft); yields the draft
        passes it needs (see `specbeam.drafters`)."""
        padded = [self.rows[r].tokens for r in rows]
        if self.draft is None or max(depths, default=0) == 0:
            return [DraftTree.root_only(p[-1]) for p in padded]
        mode = self.params.mode
        trees = yield from self.draft.propose(
            rows, padded, [self.pads[r] for r in rows], self.request.logits_processor, self.round_spec, depths,
            log_softmax=mode == BEAM, generator=self.generator,
            sample=self.sampling_probs if mode == SAMPLE else None,
            exclude=self.request.config._eos_token_tensor if mode == BEAM else None, beams=beams,
            **({"stages": self.stages[0]} if self.stages else {}),
        )
        self.stats.drafted_tokens += sum(len(t) - 1 for t in trees)
        self.stats.draft_passes = self.draft.passes
        self.stats.stage_passes = getattr(self.draft, "stage_passes", [])
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
    if len(tree) == 1:
        return Work(table, tree.tokens, 1)
    return Work(table, tree.tokens, len(tree), tree.depths(), tree.parents)
