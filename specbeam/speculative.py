"""Speculative decoding, lossless in every mode. Each round the drafter grows a tree under every running
sequence, ONE target forward scores every node of every tree, and then:

- greedy: accept the deepest path the target's argmax agrees with, plus the target's own next token;
- sampling: tree speculative sampling (accept x with probability min(1, p(x)/q(x)), else recurse on the
  residual), which emits exactly the target's distribution;
- beam search: replay transformers' beam steps while every running beam is a node of the trees (its
  distribution is then known); the first step that leaves the trees ends the round (strict top-B verification).

The K/V of each accepted path move to their committed positions; the rest of the tree is freed."""
import time
from contextlib import contextmanager

import torch

from specbeam import ops
from specbeam.beam import BeamSearch
from specbeam.config import BEAM, SAMPLE, SpecConfig
from specbeam.depth_policy import DepthPolicy
from specbeam.processing import process_rows
from specbeam.scheduler import Scheduler, _one_hot_logits
from specbeam.trace import Trace, draft_rounds
from specbeam.validation import check_finite


class SpeculativeScheduler(Scheduler):
    def __init__(self, runner, cache, request, drafter, spec: SpecConfig, streamer=None, generator=None,
                 policy: DepthPolicy | None = None):
        """policy: picks each round's draft depth (None: always `spec.depth`)."""
        super().__init__(runner, cache, request, streamer, generator)
        self.drafter, self.policy = drafter, policy
        beams = request.params.num_beams
        self.spec = spec.for_beams(beams) if request.params.mode == BEAM else spec
        self.depth = self.spec.depth
        self.pads = [request.input_ids.shape[1] - len(p) for p in request.prompts for _ in range(
            request.params.rows_per_prompt)]

    def run(self):
        self.drafter.begin(len(self.pads), self.request.params.max_length, self.spec)
        try:
            return super().run()
        finally:
            self.drafter.end()
            self.stats.draft_passes = self.drafter.passes

    # --- one round: propose, one target pass over every tree ------------------------------------------

    def _score_trees(self, rows: list[int], padded: list[list[int]], beams: list[tuple[int, float]] | None = None):
        """Trees under `rows` and the target's logits at each of their nodes: (trees, logits per tree
        [num_nodes, vocab] float32, each row's committed length before the pass). beams: per row, its prompt
        and running score (beam search: the draft then searches over all of a prompt's beams at once)."""
        max_length = self.request.params.max_length
        depths = [min(self.depth, max_length - len(p) - 1) for p in padded]
        trees = self.drafter.propose(
            rows, padded, [self.pads[r] for r in rows], self.request.logits_processor, self.spec, depths,
            log_softmax=self.request.params.mode == BEAM, generator=self.generator,
            sample=self.request.params.mode == SAMPLE,
            exclude=self.request.config._eos_token_tensor if self.request.params.mode == BEAM else None,
            beams=beams,
        )
        tables = [self.tables[r] for r in rows]
        starts = [t.length for t in tables]
        sizes = [len(t) for t in trees]
        self.stats.target_passes += 1
        self.stats.drafted_tokens += sum(sizes) - len(trees)
        logits = self.runner.forward(
            self.cache, tables, [torch.tensor(t.tokens) for t in trees],
            depths=[torch.tensor(t.depths()) for t in trees],
            tree_masks=[t.ancestor_mask() for t in trees],
            logit_rows=torch.arange(sum(sizes)),
        ).to(torch.float32)
        check_finite(logits, self.stats.steps)
        return trees, list(logits.split(sizes)), starts

    @contextmanager
    def _round(self):
        """One round at the depth the policy picks; its steps advanced per second go back to the policy."""
        if self.policy is None:
            yield
            return
        self.depth = self.policy.choose()
        steps, start = self.stats.steps, time.perf_counter()
        yield
        self.policy.record(self.depth, self.stats.steps - steps, time.perf_counter() - start)

    def _count_accepted(self, depth: int) -> None:
        self.stats.rounds += 1
        while len(self.stats.accepted_by_depth) < depth:
            self.stats.accepted_by_depth.append(0)
        for d in range(depth):
            self.stats.accepted_by_depth[d] += 1

    # --- greedy and sampling ------------------------------------------------------------------------------

    def _decode_tokens(self):
        request = self.request
        padded = [row.tolist() for row in request.input_ids]
        self.scores, self.raw = [[] for _ in padded], [[] for _ in padded]
        self.finished = [False] * len(padded)
        if self.streamer is not None:
            self.streamer.put(request.input_ids.cpu())
        self._prefill(with_last=False)
        while not all(self.finished):
            with self._round():
                self._token_round(padded)
        return self._token_output(*self._assemble(padded))

    def _token_round(self, padded: list[list[int]]) -> None:
        """Draft under every unfinished row, score every tree in one target pass, keep the verified paths."""
        request = self.request
        rows = [r for r, done in enumerate(self.finished) if not done]
        if self.depth == 0:
            return self._plain_token_step(padded, rows)
        trees, logits, starts = self._score_trees(rows, [padded[r] for r in rows])
        prefixes = [padded[r] + [t.tokens[n] for n in t.path(node)[1:]] for r, t in zip(rows, trees)
                    for node in range(len(t))]
        entry_rows = [r for r, t in zip(rows, trees) for _ in range(len(t))]
        processed = process_rows(request.logits_processor, prefixes, torch.cat(logits), entry_rows,
                                 len(padded), log_softmax=False)
        processed = list(processed.split([len(t) for t in trees]))
        paths, next_tokens = self._verify(trees, processed)
        accepted = {}
        for i, r in enumerate(rows):
            self._accept(padded, r, trees[i], paths[i], next_tokens[i], processed[i], logits[i])
            self.cache.keep_path(self.tables[r], starts[i], paths[i])
            accepted[r] = paths[i]
        self.drafter.commit([(r, accepted.get(r, [0])) for r in range(len(padded))])

    def _plain_token_step(self, padded: list[list[int]], rows: list[int]) -> None:
        """A round that drafts nothing is a plain step: the roots' K/V join their rows, and each row gets the
        token the target chooses after its root (the draft's pending tokens wait)."""
        logits = self._forward([self.tables[r] for r in rows], [torch.tensor(padded[r][-1:]) for r in rows])
        check_finite(logits, self.stats.steps)
        processed = process_rows(self.request.logits_processor, [padded[r] for r in rows], logits, rows,
                                 len(padded), log_softmax=False)
        for r, token, scores, row_logits in zip(rows, self._choose(processed).tolist(), processed, logits):
            self._emit(padded, r, token, scores, row_logits)
        self.drafter.commit([(r, []) for r in range(len(padded))])

    def _verify(self, trees, processed) -> tuple[list[list[int]], list[int]]:
        """Batched tree verification: each tree's accepted path (node indices) and the token after it."""
        width = max(len(t) for t in trees)
        scores = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[0])) for s in processed])
        device = scores.device  # the verify kernel runs where the target's scores are
        parents = torch.tensor([t.parents + [-1] * (width - len(t)) for t in trees], device=device)
        tokens = torch.tensor([t.tokens + [0] * (width - len(t)) for t in trees], device=device)
        num_nodes = torch.tensor([len(t) for t in trees], device=device)
        if self.request.params.mode == SAMPLE:
            q = torch.stack([torch.nn.functional.pad(t.draft_probs, (0, 0, 0, width - len(t))) for t in trees])
            uniform, noise = self._uniforms(parents.shape), self._uniforms(parents.shape[:1])
            path, accepted, next_token = ops.stochastic_verify(
                parents, num_nodes, tokens, scores.softmax(dim=-1), q.to(device), uniform.to(device), noise.to(device))
        else:
            path, accepted, next_token = ops.greedy_verify(parents, num_nodes, tokens, scores.argmax(dim=-1))
        paths = [p[: a + 1] for p, a in zip(path.tolist(), accepted.tolist())]
        return paths, next_token.tolist()

    def _uniforms(self, shape: torch.Size) -> torch.Tensor:
        """U(0, 1) draws from the request's generator, on the generator's device (the CPU's without one)."""
        device = self.generator.device if self.generator is not None else "cpu"
        return torch.rand(shape, generator=self.generator, device=device)

    def _accept(self, padded, row, tree, path, next_token, processed, logits) -> None:
        """Emit the accepted drafted tokens, then the recovered or bonus token, until the row stops."""
        emitted = [tree.tokens[n] for n in path[1:]] + [next_token]
        if len(tree) > 1:
            self._count_accepted(len(path) - 1)
        for node, token in zip(path, emitted):
            if self.finished[row]:
                return
            self._emit(padded, row, token, processed[node], logits[node])

    def _emit(self, padded, row: int, token: int, scores: torch.Tensor, logits: torch.Tensor) -> None:
        padded[row].append(token)
        self.scores[row].append(scores[None])  # [1, vocab], as a one-row batch's score history holds them
        self.raw[row].append(logits[None])
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        stop = self.request.stopping_criteria(torch.tensor([padded[row]]), self._history(self.scores[row]))
        self.finished[row] = bool(stop[0])
        self.stats.steps = max(self.stats.steps, len(self.scores[row]))

    def _assemble(self, padded):
        """Rows of different lengths, padded after their end, as transformers pads finished rows."""
        pad = self.request.params.pad_token_id
        steps = max(len(s) for s in self.scores)
        fill = _one_hot_logits(pad, self.scores[0][0].shape[-1], self.scores[0][0].device)[None]
        rows = [p + [pad] * (steps - len(s)) for p, s in zip(padded, self.scores)]
        scores = [torch.cat([s[t] if t < len(s) else fill for s in self.scores]) for t in range(steps)]
        raw = [torch.cat([s[t] if t < len(s) else fill for s in self.raw]) for t in range(steps)]
        return torch.tensor(rows, device=self.request.input_ids.device), scores, raw

    # --- beam search ----------------------------------------------------------------------------------------

    def _decode_beams(self):
        request = self.request
        search = BeamSearch(request.input_ids, request.params, request.config._eos_token_tensor)
        trace, scores, raw = Trace(), [], []
        self._prefill(with_last=False)
        while not search.done:
            with self._round():
                self._beam_round(search, trace, scores, raw)
        return self._beam_output(search, trace, scores, raw)

    def _beam_round(self, search: BeamSearch, trace: Trace, scores: list, raw: list) -> None:
        """Replay beam steps from one target pass while every running beam is a tree node."""
        if self.depth == 0:
            return self._plain_beam_step(search, trace, scores, raw)
        rows = self._active_beams(search).nonzero()[:, 0].tolist()
        running, scores_now = search.running_sequences().tolist(), search.running_scores.flatten().tolist()
        beams = self.request.params.num_beams
        trees, logits, starts = self._score_trees(rows, [running[r] for r in rows],
                                                  [(r // beams, scores_now[r]) for r in rows])
        tree_of = {r: i for i, r in enumerate(rows)}
        # each running beam: (row it descends from at the round's start, its node path in that row's tree)
        origin = [(r, [0] if r in tree_of else None) for r in range(len(running))]
        fill = self._frozen_beam_logits()
        replayed, first_step = 0, len(trace.steps)
        walked = [{0} for _ in rows]  # per tree: the nodes the replay walked through, for the trace
        while True:
            step_logits = torch.stack([
                logits[tree_of[o]][path[-1]] if path is not None else fill for o, path in origin])
            self._beam_step(search, step_logits, trace, scores, raw)
            replayed += 1
            if search.done:
                break
            origin, inside = self._follow(search, trees, tree_of, origin)
            _note_walked(walked, origin, tree_of)
            if not inside:
                break
        if any(len(t) > 1 for t in trees):
            self._count_accepted(replayed - 1)
        trace.drafts.extend(draft_rounds(first_step, rows, trees, walked, beams))
        self._commit_beams(origin, starts, tree_of)

    def _plain_beam_step(self, search: BeamSearch, trace: Trace, scores: list, raw: list) -> None:
        """A round that drafts nothing is a plain beam step: the roots' K/V join their own beams, which the
        new beams then fork, and the draft's tables follow the same parents (their pending tokens wait)."""
        roots = search.running_sequences()[:, -1]
        logits = self._step_rows(self._active_beams(search).nonzero()[:, 0], roots, self._frozen_beam_logits())
        self._beam_step(search, logits, trace, scores, raw)
        parents = search.parents()
        self._reorder(parents)
        self.drafter.commit([(p, []) for p in parents.tolist()])

    def _follow(self, search: BeamSearch, trees, tree_of, origin):
        """Each new running beam's origin; `inside` says whether all of them are tree nodes."""
        tokens = search.running_sequences()[:, -1].tolist()
        active = set(self._active_beams(search).nonzero()[:, 0].tolist())
        new, inside = [], True
        for beam, parent in enumerate(search.parents().tolist()):
            row, path = origin[parent]
            if path is None or path[-1] is None:
                new.append((row, path))
                continue
            child = trees[tree_of[row]].child(path[-1], tokens[beam])
            inside &= child is not None or beam not in active
            new.append((row, path + [child]))
        return new, inside

    def _commit_beams(self, origin, starts, tree_of) -> None:
        """New beams fork the table of the row they descend from and keep their path's K/V, their
        newest token (the next root) excluded."""
        old, new, draft_origins = self.tables, [], []
        for row, path in origin:
            table = self.cache.fork(old[row])
            kept = path[:-1] if path is not None else [0]
            if path is not None:
                self.cache.keep_path(table, starts[tree_of[row]], kept)
            new.append(table)
            draft_origins.append((row, kept))
        for table in old:
            self.cache.release(table)
        self.tables = new
        self.drafter.commit(draft_origins)


def _note_walked(walked: list[set[int]], origin, tree_of) -> None:
    """Add the tree nodes of every running beam's path to its tree's walked set."""
    for row, path in origin:
        if path is not None:
            walked[tree_of[row]].update(node for node in path if node is not None)
