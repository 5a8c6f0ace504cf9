"""Beam search, exact and speculative, one search per prompt. Each round every running beam feeds its root and
its draft tree (the draft searches all of a prompt's beams at once), and each prompt then replays transformers'
beam step while every new running beam is a node of the trees (its distribution is then known); the first step
that leaves them ends that prompt's round, not the others' (strict top-B verification). A tree of the root
alone is a plain beam step."""
import itertools

import torch
import torch.nn.functional as F

from specbeam.beam import NEG, BeamSearch
from specbeam.engine.beam_replay import BeamReplay, Step
from specbeam.engine.decoding import Decoding, tree_work
from specbeam.host import as_tensor
from specbeam.outputs import SpecbeamBeamOutput
from specbeam.stopping import StopCheck
from specbeam.trace import Trace, TraceStep, draft_rounds


_TRACE_FIELDS = ("parent", "token", "score", "survivors", "finished")


class BeamDecoding(Decoding):
    """The running prompts' searches are one `BeamSearch` (their lengths may differ); within a round, a replay
    step runs over the prompts still inside their trees, with other requests' that join it (`BeamReplay`), and a
    prompt leaves the search when it ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop = StopCheck(self.request.stopping_criteria)
        self.search: BeamSearch | None = BeamSearch(self.request.input_ids, self.params,  # None: all ended
                                                    self.request.config._eos_token_tensor, self.stop.max_length)
        self.ended: dict[int, BeamSearch] = {}  # per prompt, its search once it has ended
        self.log: list[Step] = []  # every beam step
        self.taken = [[] for _ in range(self.search.batch)]  # per prompt, per step: (its Step, its index in it)
        self.drafts = [[] for _ in range(self.search.batch)]  # per prompt: its DraftRounds, for the trace
        # requests of one kind replay in one search: a step treats their prompts alike (no processors or stopping
        # criteria of their own, the same eos tokens and the same kind of search); None: it replays alone
        alike = not self.request.logits_processor and not self.stop.others
        self.kind = (frozenset(self.stop.eos), self.search.kind()) if alike else None
        # the last round's joined search (`BeamReplay`): (its requests' ids, the search, each one's part of it)
        self.joined: tuple[tuple[int, ...], BeamSearch, tuple[BeamSearch, ...]] | None = None

    # --- one round ----------------------------------------------------------------------------------------

    def plan(self):  # a generator -> list[Work]
        beams = self.params.num_beams
        self.round_rows = [p * beams + b for p in self.search.prompts for b in range(beams)]
        depths = [min(self.depth, self.params.max_length - len(self.rows[r].tokens) - 1) for r in self.round_rows]
        groups = None  # (prompt, running beam score) per row, for the draft
        if self.depth:
            scores = self.search.whole().running_scores.flatten().tolist()
            groups = [(r // beams, s) for r, s in zip(self.round_rows, scores)]
        trees = yield from self.propose(self.round_rows, depths, beams=groups)
        self.trees = dict(zip(self.round_rows, trees))
        self.starts = {r: self.rows[r].table.length for r in self.round_rows}
        return [tree_work(self.rows[r].table, self.trees[r]) for r in self.round_rows]

    def start_round(self) -> None:
        """Before the replay: where each beam's tree sits in the logits; what the draft and the policy hear."""
        offsets = itertools.accumulate((len(self.trees[r]) for r in self.round_rows[:-1]), initial=0)
        self.offset = dict(zip(self.round_rows, offsets))  # per beam of the round: its root's row of its logits
        self.draft_origins = [(r, [0]) for r in range(len(self.rows))]
        self.seen, self.advanced = [], 0  # for the tree policy, added up per prompt (`end_round`)

    def end_replay(self, running_on: list[BeamSearch]) -> None:
        """After the replay: the parts of the search that run on are the search; the draft follows the beams."""
        self.search = BeamSearch.merge(running_on) if running_on else None
        if self.draft is not None:
            self.draft.commit(self.draft_origins)
        self.finished = self.search is None

    def log_step(self, step: Step, taken: list[tuple[int, int]]) -> None:
        """A replayed step that held these (index in the step, prompt) of this request."""
        self.log.append(step)
        for g, p in taken:
            self.taken[p].append((step, g))
        self.stats.steps = max(self.stats.steps, max(len(self.taken[p]) for _, p in taken))

    def scores_so_far(self, prompts: list[int]):
        """The processed scores so far of prompts of one length, as transformers passes them to stopping
        criteria."""
        if not self.request.config.output_scores:
            return None
        return tuple(scores for scores, in self._per_step(("scores",), len(self.taken[prompts[0]]), prompts))

    def end_round(self, p: int, first_step: int, replayed: int, walked: dict, ended: bool) -> None:
        """Count what prompt p's round accepted and record its drafted trees for the trace. For the tree policy:
        the replay went on past depths 1 .. replayed - 1 and, unless the search ended, stopped at the next one
        if it was drafted."""
        beams = self.params.num_beams
        rows = [p * beams + b for b in range(beams)]
        trees = [self.trees[r] for r in rows]
        self.advanced += replayed
        if any(len(t) > 1 for t in trees):
            self.count_accepted(replayed - 1)
            self.seen += [(d, 0, 1) for d in range(1, replayed)]
            if not ended and replayed <= max(max(t.depths()) for t in trees):
                self.seen.append((replayed, None, 1))
            self.drafts[p] += draft_rounds(first_step, rows, trees, [walked[r] for r in rows], beams)

    def end_search(self, part: BeamSearch) -> None:
        """The prompt of `part` (a search of it alone) has its final hypotheses: its rows' blocks are free at once."""
        p, beams = part.prompts[0], self.params.num_beams
        self.ended[p] = part
        for row in self.rows[p * beams:(p + 1) * beams]:
            self.release_row(row)

    def commit_beams(self, group: BeamSearch, origin: list[tuple[int, list]], tails: list[list[int]]) -> BeamSearch:
        """New beams fork the table of the beam they descend from and keep their path's K/V, their newest token
        (the next root) excluded; the draft's rows follow them. Their tokens: the source's and `tails`, each new
        beam's tokens of this round."""
        beams = self.params.num_beams
        rows = [p * beams + b for p in group.prompts for b in range(beams)]
        old = {r: self.rows[r].table for r in rows}
        old_tokens = {r: self.rows[r].tokens for r in rows}
        tables = self.cache.continue_tables([old[source] for source, _ in origin], list(old.values()))
        for r, table in zip(rows, tables):
            self.rows[r].table = table
        if self.depth:  # (a plain round's beams keep their root where it is)
            self.cache.keep_paths([(self.rows[r].table, self.starts[source], path[:-1]) for r, (source, path) in
                                   zip(rows, origin)])
        for r, (source, path) in zip(rows, origin):
            self.draft_origins[r] = (source, path[:-1])
        for r, (source, _), new in zip(rows, origin, tails):
            self.rows[r].tokens = old_tokens[source] + new
        return group

    def num_trees(self) -> int:
        """A prompt's beams' trees are drafted together: one per running prompt."""
        return self.search.batch if self.search is not None else 0

    # --- output -------------------------------------------------------------------------------------------

    def take_new_tokens(self) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Beams are not final until the search ends: nothing streams."""
        return [[] for _ in self.rows or []], None

    def result(self):
        config = self.request.config
        sequences, sequence_scores, beam_indices = self._results()
        if not config.return_dict_in_generate:
            return sequences
        names = ("scores",) * bool(config.output_scores) + ("raw",) * bool(config.output_logits)
        per_step = dict(zip(names, zip(*self._per_step(names, self.stats.steps)))) if names else {}
        per_step.update((name, self._trace_field(name)) for name in _TRACE_FIELDS)  # name -> per step
        trace = Trace([TraceStep(*fields) for fields in zip(*(per_step[f] for f in _TRACE_FIELDS))],
                      drafts=[d for drafts in self.drafts for d in drafts])
        trace.mark_returned(sequences, beam_indices, self.request.input_ids.shape[1])
        return SpecbeamBeamOutput(
            sequences=sequences,
            sequences_scores=sequence_scores if config.output_scores else None,
            scores=per_step.get("scores"),
            logits=per_step.get("raw"),
            beam_indices=beam_indices,
            trace=trace,
            stats=self.stats,
        )

    def _results(self):
        """Every prompt's best hypotheses, padded to the longest as transformers pads them; beam indices count
        beams over the whole batch."""
        searches = [self.ended[p] for p in range(len(self.ended))]
        results = [s.results() for s in searches]
        length = max(seq.shape[1] for seq, _, _ in results)
        generated = max(origin.shape[1] for _, _, origin in results)
        beams = self.params.num_beams
        sequences = torch.cat([F.pad(seq, (0, length - seq.shape[1]), value=s.fill)
                               for (seq, _, _), s in zip(results, searches)])
        indices = torch.cat([F.pad(torch.where(origin >= 0, origin + p * beams, -1), (0, generated - origin.shape[1]),
                                   value=-1) for p, (_, _, origin) in enumerate(results)])
        return sequences, torch.cat([scores for _, scores, _ in results]), indices

    def _per_step(self, names: tuple[str, ...], steps: int, prompts: list[int] | None = None) -> list[tuple]:
        """Per step, fields `names` of every prompt (or of `prompts`), concatenated: consecutive prompts that one
        step holds in order are read as one slice of it (all of them: the step as it is). A prompt whose search
        has ended shows `_ended_rows`."""
        prompts = list(range(len(self.taken))) if prompts is None else prompts
        ended = self._ended_rows() if any(len(self.taken[p]) < steps for p in prompts) else {}
        out = []
        for t in range(steps):
            runs = []  # [step or None, its first index, prompts]
            for s, g in (self.taken[p][t] if t < len(self.taken[p]) else (None, 0) for p in prompts):
                if runs and runs[-1][0] is s and (s is None or runs[-1][1] + runs[-1][2] == g):
                    runs[-1][2] += 1
                else:
                    runs.append([s, g, 1])
            out.append(tuple(_cat([s.part(name, g, n) if s is not None else ended[name].repeat(n, 1)
                                   for s, g, n in runs]) for name in names))
        return out

    def _trace_field(self, name: str) -> tuple[torch.Tensor, ...]:
        """Per step, a small field of every prompt (as `_per_step` gives it), read in one gather from every step
        at once: a prompt's steps fall in different replays, so that a step's prompts are rarely one slice."""
        steps, taken = self.stats.steps, self.taken
        ended = self._ended_rows()[name] if any(len(t) < steps for t in taken) else None
        sources, base, total = [], {}, 0  # every step's field once; where each starts among them
        for step in self.log:
            if id(step) not in base:
                sources.append(step.part(name, 0, len(step.prompts)))
                base[id(step)], total = total, total + sources[-1].shape[0]
        rows = sources[0].shape[0] // len(self.log[0].prompts)  # per prompt
        if ended is not None:
            base[None] = total
            sources.append(ended)
        index = [base[id(t[i][0])] + t[i][1] * rows + r if i < len(t) else base[None] + r
                 for i in range(steps) for t in taken for r in range(rows)]
        flat = torch.cat(sources).index_select(0, as_tensor(index, sources[0].device))
        return flat.view(steps, -1, *flat.shape[1:]).unbind(0)

    def _ended_rows(self) -> dict[str, torch.Tensor]:
        """What a prompt whose search has ended shows, per field: uniform log-probabilities (transformers keeps
        feeding it; its rows are not part of any result) and candidates that were dropped."""
        trace, scores, beams = self.log[0].trace, self.log[0].scores, self.params.num_beams
        k, device = trace.token.shape[1], scores.device
        uniform = F.log_softmax(torch.zeros(beams, scores.shape[-1], device=device), dim=-1)
        return dict(
            scores=uniform, raw=uniform,
            parent=torch.zeros(1, k, dtype=trace.parent.dtype, device=device),
            token=torch.zeros(1, k, dtype=trace.token.dtype, device=device),
            score=torch.full((1, k), NEG, dtype=trace.score.dtype, device=device),
            survivors=torch.arange(beams, device=device)[None],
            finished=torch.zeros(1, k, dtype=torch.bool, device=device),
        )


def absorb_beams(members: list[BeamDecoding], logits: torch.Tensor, firsts: list[int]) -> None:
    """One round of beam requests of one kind (`BeamDecoding.kind`), replayed as one search. logits: [rows, vocab]
    holding each member's tree nodes from row firsts[k] on."""
    for member in members:
        member.start_round()
    running_on = BeamReplay(members, logits, firsts).run()
    for member in members:
        member.end_replay(running_on.get(member, []))


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
