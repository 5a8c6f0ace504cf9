"""Greedy decoding and sampling: each row keeps the deepest path of its draft tree that the target verifies,
then the target's own next token after it (greedy: the argmax; sampling: tree speculative sampling, which emits
exactly the target's processed distribution). A tree of the root alone is a plain step."""
import itertools
from collections import defaultdict

import torch

from specbeam.config import SAMPLE
from specbeam.engine.decoding import Decoding, tree_work
from specbeam.host import as_tensor
from specbeam.outputs import SpecbeamOutput
from specbeam.processing import penalize, penalties_of, process_trees, skips_of, tree_prefixes
from specbeam.stopping import StopCheck
from specbeam.tree import DraftTree
from specbeam.verification import draw_uniforms, verify_trees


class TokenDecoding(Decoding):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        num_rows = self.request.input_ids.shape[0]
        self.scores, self.raw = [[] for _ in range(num_rows)], [[] for _ in range(num_rows)]
        self.sent = [0] * num_rows  # per row, generated tokens already handed out
        # what each token's history keeps: its scores (None where the caller reads none), its logits
        self.keeps = (self.request.config.output_scores, self.request.config.output_logits)
        self.stop = StopCheck(self.request.stopping_criteria)

    def after_prefill(self) -> None:
        """The streamer hears the prompt once it is admitted (a request refused before any work sends nothing)."""
        if self.rows is None and self.streamer is not None:
            self.streamer.put(self.request.input_ids.cpu())
        super().after_prefill()

    # --- one round ----------------------------------------------------------------------------------------

    def plan(self):  # a generator -> list[Work]
        self.round_rows = [r for r, row in enumerate(self.rows) if row.table is not None]
        max_length = self.params.max_length
        depths = [min(self.depth, max_length - len(self.rows[r].tokens) - 1) for r in self.round_rows]
        self.trees = yield from self.propose(self.round_rows, depths)
        self.starts = [self.rows[r].table.length for r in self.round_rows]
        return [tree_work(self.rows[r].table, t) for r, t in zip(self.round_rows, self.trees)]

    def round_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:  # [tree nodes, vocab] -> per tree
        """Per tree of the round: its logits [nodes, vocab], in float32."""
        return list(logits.to(torch.float32).split_with_sizes([len(t) for t in self.trees]))

    def commit_round(self, logits: list[torch.Tensor], processed: list[torch.Tensor], paths: list[list[int]],
                     next_tokens: list[int]) -> None:
        """Each row keeps its tree's accepted path (its K/V, its tokens) and the token after it."""
        self.advanced = 0
        accepted, kept = {}, []
        for i, r in enumerate(self.round_rows):
            self._accept(r, self.trees[i], paths[i], next_tokens[i], self._reported(processed[i]), logits[i])
            if self.rows[r].table is not None:
                kept.append((self.rows[r].table, self.starts[i], paths[i]))
            accepted[r] = paths[i]
        if self.depth:  # (a plain round's rows keep their root where it is)
            self.cache.keep_paths(kept)
        if self.draft is not None and self.depth:  # (a plain round left the draft's rows as they were)
            self.draft.commit([(r, accepted.get(r, [0])) for r in range(len(self.rows))])
        if self.policy is not None and self.depth:
            self.seen = [seen for tree, path in zip(self.trees, paths) if len(tree) > 1
                         for seen in self.policy.shape.observations(tree, path)]
        self.finished = all(row.table is None for row in self.rows)

    def process(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:  # per tree: [nodes, vocab]
        """The request's logits processors at every node, each with its own prefix."""
        return process_trees(self.request.logits_processor, [self.rows[r].tokens for r in self.round_rows],
                             self.trees, logits, self.round_rows, len(self.rows), log_softmax=False)

    def prefixes(self) -> tuple[list[list[int]], list[int]]:
        """Per node of the round's trees: its prefix and its row (`processing.tree_prefixes`)."""
        return tree_prefixes([self.rows[r].tokens for r in self.round_rows], self.trees, self.round_rows)

    def _reported(self, processed: torch.Tensor) -> torch.Tensor:  # [nodes, vocab] -> [nodes, vocab]
        """What `output_scores` reports at each node: under the fused filter, transformers' warped scores (the
        logits over the temperature where the filter keeps a token, -inf elsewhere)."""
        if self.params.warpers is None or not self.request.config.output_scores:
            return processed
        kept = self.sampling_probs(processed) > 0
        return (processed / self.params.warpers[0]).masked_fill(~kept, float("-inf"))

    def _accept(self, r: int, tree: DraftTree, path: list[int], next_token: int,
                processed: torch.Tensor, logits: torch.Tensor) -> None:  # [tree nodes, vocab] each
        """Emit the accepted drafted tokens, then the recovered or bonus token, until the row stops."""
        emitted = [tree.tokens[n] for n in path[1:]] + [next_token]
        if len(tree) > 1:
            self.count_accepted(len(path) - 1)
        for node, token in zip(path, emitted):
            if self.rows[r].table is None:
                return
            self.advanced += 1
            self._emit(r, token, node, processed, logits)

    def _emit(self, r: int, token: int, node: int, scores: torch.Tensor, logits: torch.Tensor) -> None:
        """The row's next token, read at `node` of its tree's scores and logits ([tree nodes, vocab] each)."""
        row = self.rows[r]
        row.tokens.append(token)
        keeps_scores, keeps_logits = self.keeps
        # [1, vocab], as a one-row batch's score history holds them
        self.scores[r].append(scores[node, None] if keeps_scores else None)
        if keeps_logits:
            self.raw[r].append(logits[node, None])
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        if self.stop(row.tokens, lambda: self.history(self.scores[r]), self.request.input_ids.device):
            self.release_row(row)  # its blocks are free at once
        self.stats.steps = max(self.stats.steps, len(self.scores[r]))

    # --- output -------------------------------------------------------------------------------------------

    def take_new_tokens(self) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        new = [row.tokens[len(row.tokens) - len(s) + sent:] for row, s, sent in zip(self.rows or [], self.scores,
                                                                                   self.sent)]
        logits = None
        if self.request.config.output_logits:
            logits = [torch.cat(raw[sent:]) if len(raw) > sent else raw_empty(raw) for raw, sent in
                      zip(self.raw, self.sent)]
        self.sent = [len(s) for s in self.scores]
        return new, logits

    def result(self):
        """Rows of different lengths padded after their end, as transformers pads finished rows."""
        config, pad = self.request.config, self.params.pad_token_id
        steps = max(len(s) for s in self.scores)
        rows = [row.tokens + [pad] * (steps - len(s)) for row, s in zip(self.rows, self.scores)]
        sequences = as_tensor(rows, self.request.input_ids.device)
        if not config.return_dict_in_generate:
            return sequences
        return SpecbeamOutput(
            sequences=sequences,
            scores=self._per_step(self.scores) if config.output_scores else None,
            logits=self._per_step(self.raw) if config.output_logits else None,
            stats=self.stats,
        )

    def _per_step(self, history: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:  # per row: [1, vocab] each
        """Per step [rows, vocab]: a finished row's entries are those of padding."""
        vocab, device = history[0][0].shape[-1], history[0][0].device
        fill = one_hot_logits(self.params.pad_token_id, vocab, device)[None]
        steps = max(len(h) for h in history)
        return tuple(torch.cat([h[t] if t < len(h) else fill for h in history]) for t in range(steps))


def raw_empty(raw: list[torch.Tensor]) -> torch.Tensor:  # [0, vocab]
    return raw[0][:0] if raw else torch.empty(0, 0)


def one_hot_logits(pad: int | None, vocab: int, device) -> torch.Tensor:  # [vocab]
    """Logits of a finished sequence: it can only emit padding."""
    logits = torch.full((vocab,), float("-inf"), device=device)
    if pad is not None and 0 <= pad < vocab:
        logits[pad] = 0.0
    return logits


def absorb_tokens(members: list[TokenDecoding], logits: list[torch.Tensor]) -> list[tuple[TokenDecoding, Exception]]:
    """One round of greedy and sampling requests (logits: each one's [tree nodes, vocab]). Their trees are verified
    in one batch per kind: the greedy ones, and the sampling ones per filter (temperature, top-k, top-p, min-p),
    each drawing its uniforms from its own generator. Returns the requests that failed (a processor, a stopping
    criterion), with their error; the others are unaffected."""
    raw = {member: member.round_logits(mine) for member, mine in zip(members, logits)}
    processed, failures = _processed(raw)
    kinds = defaultdict(list)  # requests whose trees verify in one batch
    for member in processed:
        kinds[member.params.mode == SAMPLE, member.params.warpers].append(member)
    verdicts = {}
    for (sample, _), batch in kinds.items():
        trees = [t for m in batch for t in m.trees]
        width = max(len(t) for t in trees)
        draws = [draw_uniforms(m.trees, m.generator, width) for m in batch] if sample else None
        paths, next_tokens = verify_trees(trees, [p for m in batch for p in processed[m]],
                                          batch[0].sampling_probs if sample else None,
                                          tuple(map(torch.cat, zip(*draws))) if sample else None)
        verdicts.update(zip(batch, zip(_per_member(paths, batch), _per_member(next_tokens, batch))))
    for member, scores in processed.items():
        try:
            member.commit_round(raw[member], scores, *verdicts[member])
        except Exception as error:  # noqa: BLE001
            failures.append((member, error))
    return failures


def _per_member(flat: list, members: list[TokenDecoding]) -> list[list]:
    """Values over the members' trees, in order, as each member's part."""
    bounds = [0, *itertools.accumulate(len(m.trees) for m in members)]
    return [list(flat[a:b]) for a, b in zip(bounds, bounds[1:])]


def _processed(raw: dict[TokenDecoding, list[torch.Tensor]]) -> tuple[dict, list]:
    """Each request's processed scores, per tree [nodes, vocab], and the requests whose processors failed. Requests
    whose processors are repetition penalties alone, of equal penalties, are processed in one call."""
    processed, failures, by_penalties = {}, [], defaultdict(list)
    for member in raw:
        penalties = penalties_of(member.request.logits_processor)
        if penalties is not None:
            by_penalties[penalties].append(member)
    for group in (g for g in by_penalties.values() if len(g) > 1):
        processed.update(_penalized_together(group, raw))
    for member, logits in raw.items():
        if member not in processed:
            try:
                processed[member] = member.process(logits)
            except Exception as error:  # noqa: BLE001: the request's own
                failures.append((member, error))
    return {member: processed[member] for member in raw if member in processed}, failures  # (in their order)


def _penalized_together(group: list[TokenDecoding], raw: dict) -> dict[TokenDecoding, list[torch.Tensor]]:
    """The repetition penalties of requests with equal ones, on every node of their trees in one call."""
    prefixes, skips = [], []
    for member in group:
        mine, rows = member.prefixes()
        prefixes += mine
        skips += skips_of(member.request.logits_processor, rows)
    scores = penalize(group[0].request.logits_processor.token_sets[0], prefixes, skips,
                      torch.cat([tree for member in group for tree in raw[member]]))
    return dict(zip(group, _per_member(scores.split([len(t) for m in group for t in m.trees]), group)))
