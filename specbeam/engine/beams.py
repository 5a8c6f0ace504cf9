"""Beam search, exact and speculative, one search per prompt. Each round every running beam feeds its root and
its draft tree (the draft searches all of a prompt's beams at once), and each prompt then replays transformers'
beam step while every new running beam is a node of the trees (its distribution is then known); the first step
that leaves them ends that prompt's round, not the others' (strict top-B verification). A tree of the root
alone is a plain beam step."""
import torch
import torch.nn.functional as F

from specbeam.beam import NEG, BeamSearch
from specbeam.engine.decoding import Decoding, tree_work
from specbeam.model_runner import Work
from specbeam.outputs import SpecbeamBeamOutput
from specbeam.processing import process_rows
from specbeam.trace import Trace, TraceStep, draft_rounds
from specbeam.tree import DraftTree
from specbeam.validation import check_finite


_TRACE_FIELDS = ("parent", "token", "score", "survivors", "finished")


class BeamDecoding(Decoding):
    """The running prompts' searches are one `BeamSearch` (their lengths may differ); within a round, a replay
    step runs over the prompts still inside their trees, and a prompt leaves the search when it ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.search: BeamSearch | None = BeamSearch(self.request.input_ids, self.params,
                                                    self.request.config._eos_token_tensor)  # None: all ended
        self.ended: dict[int, BeamSearch] = {}  # per prompt, its search once it has ended
        prompts = range(self.search.batch)
        self.traces = [Trace() for _ in prompts]
        self.scores = [[] for _ in prompts]  # per prompt, per step: [beams, vocab] processed log-probs
        self.raw = [[] for _ in prompts]

    # --- one round ----------------------------------------------------------------------------------------

    def plan(self):  # a generator -> list[Work]
        beams = self.params.num_beams
        self.round_rows = [p * beams + b for p in self.search.prompts for b in range(beams)]
        scores = self.search.running_scores.flatten().tolist()
        depths = [min(self.depth, self.params.max_length - len(self.rows[r].tokens) - 1) for r in self.round_rows]
        groups = [(r // beams, s) for r, s in zip(self.round_rows, scores)]  # (prompt, running beam score)
        trees = yield from self.propose(self.round_rows, depths, beams=groups)
        self.trees = dict(zip(self.round_rows, trees))
        self.starts = {r: self.rows[r].table.length for r in self.round_rows}
        return [tree_work(self.rows[r].table, self.trees[r]) for r in self.round_rows]

    def absorb(self, logits: list[torch.Tensor]) -> None:  # per beam of the round: [tree nodes, vocab]
        logits = [x.to(torch.float32) for x in logits]
        check_finite(torch.cat(logits), self.stats.steps)
        self.logits = dict(zip(self.round_rows, logits))
        self.draft_origins = [(r, [0]) for r in range(len(self.rows))]
        self.seen, self.advanced = [], 0  # for the tree policy, added up per prompt (`_end_round`)
        running_on = self._replay(self.search)
        self.search = BeamSearch.merge(running_on) if running_on else None
        if self.draft is not None:
            self.draft.commit(self.draft_origins)
        self.finished = self.search is None

    def _replay(self, group: BeamSearch) -> list[BeamSearch]:
        """Beam steps of the search from one target pass: a prompt goes on while every running beam of it is a
        tree node (its distribution is known), and its round ends at the first step that leaves its trees (the
        others step on without it). Returns the parts of the search that run on."""
        beams = self.params.num_beams
        # per running beam: (the request row it descends from at the round's start, its node path in that row's
        # tree, the last entry the new root's node or None)
        origin = [(p * beams + b, [0]) for p in group.prompts for b in range(beams)]
        first = {p: len(self.traces[p].steps) for p in group.prompts}
        walked = {r: {0} for r, _ in origin}
        replayed, running_on = 0, []
        while True:
            self._beam_step(group, torch.stack([self.logits[r][path[-1]] for r, path in origin]))
            replayed += 1
            done = group.prompts_done().tolist()
            origin, inside = _follow(group, self.trees, origin)
            for r, path in origin:
                walked[r].update(node for node in path if node is not None)
            stop = [g for g in range(group.batch) if done[g] or not inside[g]]
            for g in stop:
                self._end_round(group.prompts[g], first[group.prompts[g]], replayed, walked, done[g])
            for g in (g for g in stop if done[g]):
                self._end_search(group, g)
            stopped = [g for g in stop if not done[g]]
            if stopped:
                part = group if len(stopped) == group.batch else group.split(stopped)
                running_on.append(self._commit(part, [origin[g * beams + b] for g in stopped for b in range(beams)],
                                               replayed))
            going = [g for g in range(group.batch) if g not in stop]
            if not going:
                return running_on
            if stop:
                group, origin = group.split(going), [origin[g * beams + b] for g in going for b in range(beams)]

    def _beam_step(self, group: BeamSearch, logits: torch.Tensor) -> None:  # [group rows, vocab] their logits
        beams, processors = self.params.num_beams, self.request.logits_processor
        log_probs = F.log_softmax(logits, dim=-1)
        if processors and group.batch * beams == len(self.rows) and group.same_length():  # as transformers
            log_probs = processors(group.tail(group.lengths[0]), log_probs)
        elif processors:
            rows = [p * beams + b for p in group.prompts for b in range(beams)]
            log_probs = process_rows(processors, group.running_sequences(), logits, rows, len(self.rows),
                                     log_softmax=True)
        step = group.step(log_probs, self.request.stopping_criteria, self._history)
        per_prompt = zip(group.prompts, log_probs.view(group.batch, beams, -1), logits.view(group.batch, beams, -1))
        for g, (p, scores, raw) in enumerate(per_prompt):
            self.scores[p].append(scores)
            self.raw[p].append(raw)
            self.traces[p].steps.append(TraceStep(*(getattr(step, f)[g:g + 1] for f in _TRACE_FIELDS)))
            self.stats.steps = max(self.stats.steps, len(self.scores[p]))

    def _history(self, prompts: list[int]):
        """The processed scores so far of prompts of one length, as transformers passes them to stopping
        criteria."""
        if not self.request.config.output_scores:
            return None
        steps = len(self.scores[prompts[0]])
        return tuple(torch.cat([self.scores[p][t] for p in prompts]) for t in range(steps))

    def _end_round(self, p: int, first_step: int, replayed: int, walked: dict, ended: bool) -> None:
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
        self.traces[p].drafts += draft_rounds(first_step, rows, trees, [walked[r] for r in rows], beams)

    def _end_search(self, group: BeamSearch, g: int) -> None:
        """Prompt g of the group has its final hypotheses: its rows' blocks are free at once."""
        p, beams = group.prompts[g], self.params.num_beams
        self.ended[p] = group.split([g])
        for row in self.rows[p * beams:(p + 1) * beams]:
            self.release_row(row)

    def _commit(self, group: BeamSearch, origin: list[tuple[int, list]], replayed: int) -> BeamSearch:
        """New beams fork the table of the beam they descend from and keep their path's K/V, their newest token
        (the next root) excluded; the draft's rows follow them. Their tokens: the source's and the `replayed`
        new ones."""
        beams = self.params.num_beams
        rows = [p * beams + b for p in group.prompts for b in range(beams)]
        old = {r: self.rows[r].table for r in rows}
        old_tokens = {r: self.rows[r].tokens for r in rows}
        takers = {}  # per source row: its new beams; the first takes its table over, the others fork it
        for r, (source, _) in zip(rows, origin):
            takers.setdefault(source, []).append(r)
        for source, table in old.items():
            for r in takers.get(source, [])[1:]:
                self.rows[r].table = self.cache.fork(table)
            if source in takers:
                self.rows[takers[source][0]].table = table
            else:
                self.cache.release(table)
        for r, (source, path) in zip(rows, origin):
            self.cache.keep_path(self.rows[r].table, self.starts[source], path[:-1])
            self.draft_origins[r] = (source, path[:-1])
        for r, (source, _), new in zip(rows, origin, group.tail(replayed).tolist()):
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
        steps = self.stats.steps
        trace = _merge_traces(self.traces, steps, self.params.num_beams)
        trace.mark_returned(sequences, beam_indices, self.request.input_ids.shape[1])
        return SpecbeamBeamOutput(
            sequences=sequences,
            sequences_scores=sequence_scores if config.output_scores else None,
            scores=tuple(self._per_step(self.scores, steps)) if config.output_scores else None,
            logits=tuple(self._per_step(self.raw, steps)) if config.output_logits else None,
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

    def _per_step(self, history: list[list[torch.Tensor]], steps: int) -> list[torch.Tensor]:
        """Per step, every prompt's beams [batch * beams, vocab]; a prompt whose search has ended shows uniform
        log-probabilities (transformers keeps feeding it; its rows are not part of any result)."""
        vocab = history[0][0].shape[-1]
        ended = F.log_softmax(torch.zeros(self.params.num_beams, vocab, device=history[0][0].device), dim=-1)
        return [torch.cat([h[t] if t < len(h) else ended for h in history]) for t in range(steps)]


def _follow(search: BeamSearch, trees: dict[int, DraftTree], origin) -> tuple[list, list[bool]]:
    """Each new running beam's origin after one more replayed step, and per prompt whether all of its running
    beams are tree nodes."""
    tokens = search.tail(1).flatten().tolist()
    beams = search.params.num_beams
    new, inside = [], [True] * search.batch
    for beam, parent in enumerate(search.parents().tolist()):
        row, path = origin[parent]
        child = trees[row].child(path[-1], tokens[beam])
        inside[beam // beams] &= child is not None
        new.append((row, path + [child]))
    return new, inside


def _merge_traces(traces: list[Trace], steps: int, beams: int) -> Trace:
    """One trace over the batch: per step, every prompt's candidates; a prompt whose search has ended shows
    candidates that were dropped."""
    like = traces[0].steps[0]
    k, device = like.token.shape[1], like.token.device
    ended = TraceStep(torch.zeros(1, k, dtype=like.parent.dtype, device=device),
                      torch.zeros(1, k, dtype=like.token.dtype, device=device),
                      torch.full((1, k), NEG, dtype=like.score.dtype, device=device),
                      torch.arange(beams, device=device)[None], torch.zeros(1, k, dtype=torch.bool, device=device))
    merged = Trace(drafts=[d for trace in traces for d in trace.drafts])
    for t in range(steps):
        parts = [trace.steps[t] if t < len(trace.steps) else ended for trace in traces]
        merged.steps.append(TraceStep(*(torch.cat([getattr(s, f) for s in parts]) for f in _TRACE_FIELDS)))
    return merged
