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


class BeamDecoding(Decoding):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        beams, eos = self.params.num_beams, self.request.config._eos_token_tensor
        ids = self.request.input_ids
        self.searches = [BeamSearch(ids[p * beams:(p + 1) * beams], self.params, eos)
                         for p in range(len(self.request.prompts))]
        self.traces = [Trace() for _ in self.searches]
        self.scores = [[] for _ in self.searches]  # per prompt, per step: [beams, vocab] processed log-probs
        self.raw = [[] for _ in self.searches]

    # --- one round ----------------------------------------------------------------------------------------

    def plan(self) -> list[Work]:
        beams = self.params.num_beams
        self.round_prompts = [p for p, s in enumerate(self.searches) if not s.done]
        rows = [p * beams + b for p in self.round_prompts for b in range(beams)]
        scores = {p: self.searches[p].running_scores.flatten().tolist() for p in self.round_prompts}
        depths = [min(self.depth, self.params.max_length - len(self.rows[r].tokens) - 1) for r in rows]
        self.trees = self.propose(rows, depths, beams=[(r // beams, scores[r // beams][r % beams]) for r in rows])
        self.starts = [self.rows[r].table.length for r in rows]
        return [tree_work(self.rows[r].table, t) for r, t in zip(rows, self.trees)]

    def absorb(self, logits: list[torch.Tensor]) -> None:  # per beam of the round: [tree nodes, vocab]
        beams = self.params.num_beams
        logits = [x.to(torch.float32) for x in logits]
        check_finite(torch.cat(logits), self.stats.steps)
        draft_origins = [(r, [0]) for r in range(len(self.rows))]
        for i, p in enumerate(self.round_prompts):
            part = slice(i * beams, (i + 1) * beams)
            origin = self._replay(p, self.trees[part], logits[part])
            if self.searches[p].done:
                for row in self.rows[p * beams:(p + 1) * beams]:
                    self.release_row(row)
                continue
            for b, kept in enumerate(self._commit(p, origin, self.starts[part])):
                draft_origins[p * beams + b] = kept
        if self.draft is not None:
            self.draft.commit(draft_origins)
        self.finished = all(s.done for s in self.searches)

    def _replay(self, p: int, trees: list[DraftTree], logits: list[torch.Tensor]) -> list[tuple[int, list]]:
        """Beam steps of prompt p from one target pass, while every running beam is a tree node. Returns each
        new running beam's origin: (the beam it descends from at the round's start, its node path in that
        beam's tree, the last entry the new root's node or None)."""
        search, origin, replayed = self.searches[p], [(b, [0]) for b in range(len(trees))], 0
        first_step, walked = len(self.traces[p].steps), [{0} for _ in trees]  # per tree: nodes that became beams
        while True:
            self._beam_step(p, torch.stack([logits[b][path[-1]] for b, path in origin]))
            replayed += 1
            if search.done:
                break
            origin, inside = _follow(search, trees, origin)
            for b, path in origin:
                walked[b].update(node for node in path if node is not None)
            if not inside:
                break
        if any(len(t) > 1 for t in trees):
            self.count_accepted(replayed - 1)
        beams = self.params.num_beams
        self.traces[p].drafts += draft_rounds(first_step, [p * beams + b for b in range(beams)], trees, walked, beams)
        return origin

    def _beam_step(self, p: int, logits: torch.Tensor) -> None:  # [beams, vocab] the running beams' logits
        search, beams = self.searches[p], self.params.num_beams
        running = search.running_sequences()
        log_probs = process_rows(self.request.logits_processor, running.tolist(), logits,
                                 list(range(p * beams, (p + 1) * beams)), len(self.rows), log_softmax=True)
        self.raw[p].append(logits)
        self.scores[p].append(log_probs)
        self.traces[p].steps.append(search.step(log_probs, self.request.stopping_criteria,
                                                self.history(self.scores[p])))
        self.stats.steps = max(self.stats.steps, len(self.scores[p]))

    def _commit(self, p: int, origin: list[tuple[int, list]], starts: list[int]) -> list[tuple[int, list[int]]]:
        """New beams fork the table of the beam they descend from and keep their path's K/V, their newest token
        (the next root) excluded. Returns each new beam's draft origin (request row, kept path)."""
        beams = self.params.num_beams
        rows = self.rows[p * beams:(p + 1) * beams]
        old, kept_paths = [row.table for row in rows], []
        for row, (b, path) in zip(rows, origin):
            row.table = self.cache.fork(old[b])
            self.cache.keep_path(row.table, starts[b], path[:-1])
            kept_paths.append((p * beams + b, path[:-1]))
        for table in old:
            self.cache.release(table)
        for row, tokens in zip(rows, self.searches[p].running_sequences().tolist()):
            row.tokens = tokens
        return kept_paths

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
        results = [s.results() for s in self.searches]
        length = max(seq.shape[1] for seq, _, _ in results)
        generated = max(origin.shape[1] for _, _, origin in results)
        beams = self.params.num_beams
        sequences = torch.cat([F.pad(seq, (0, length - seq.shape[1]), value=s.fill)
                               for (seq, _, _), s in zip(results, self.searches)])
        indices = torch.cat([F.pad(torch.where(origin >= 0, origin + p * beams, -1), (0, generated - origin.shape[1]),
                                   value=-1) for p, (_, _, origin) in enumerate(results)])
        return sequences, torch.cat([scores for _, scores, _ in results]), indices

    def _per_step(self, history: list[list[torch.Tensor]], steps: int) -> list[torch.Tensor]:
        """Per step, every prompt's beams [batch * beams, vocab]; a prompt whose search has ended shows uniform
        log-probabilities (transformers keeps feeding it; its rows are not part of any result)."""
        vocab = history[0][0].shape[-1]
        ended = F.log_softmax(torch.zeros(self.params.num_beams, vocab, device=history[0][0].device), dim=-1)
        return [torch.cat([h[t] if t < len(h) else ended for h in history]) for t in range(steps)]


def _follow(search: BeamSearch, trees: list[DraftTree], origin) -> tuple[list, bool]:
    """Each new running beam's origin after one more replayed step; `inside`: all of them are tree nodes."""
    tokens = search.running_sequences()[:, -1].tolist()
    new, inside = [], True
    for beam, parent in enumerate(search.parents().tolist()):
        b, path = origin[parent]
        child = trees[b].child(path[-1], tokens[beam])
        inside &= child is not None
        new.append((b, path + [child]))
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
        merged.steps.append(TraceStep(*(torch.cat([getattr(s, f) for s in parts]) for f in
                                        ("parent", "token", "score", "survivors", "finished"))))
    return merged
