"""Beam search with transformers' exact semantics (`GenerationMixin._beam_search`), one step at a time.

The state is transformers' own: running beams and their scores, the best finished hypotheses, the
early-stopping heuristic. `step` consumes the processed log-probabilities of the running beams and replays
the same tensor operations in the same dtype, so ties and float32 rounding fall the same way. Speculative
beam search calls `step` several times per target pass, with distributions read off the draft tree.

One search may hold prompts of different lengths (speculative rounds advance each prompt by its own number of
steps; a search joined from several requests' has prompts of different widths and limits): each prompt's tokens
are written at its own length, its backpointers at its own step, its length penalty divides by its own generated
length (as a float32 tensor of the Python doubles transformers divides by: the same bits), and stopping criteria
other than max-length and eos run once per distinct length, on those prompts alone, as on a search of them.

Each step keeps K = max(2, 1 + num_eos) * B candidates per prompt: the top-K of (running score +
log p(token)) over B beams x V tokens. The best B that do not stop become the running beams; those among the
top B that do stop enter the finished hypotheses with score sum / (generated length ** length_penalty).
"""
import copy
from collections import defaultdict
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from specbeam.config import SamplingParams
from specbeam.host import as_tensor
from specbeam.stopping import StopCheck
from specbeam.trace import TraceStep

NEG = -1.0e9  # transformers' "impossible" score
# the state tensors whose first dimension is the prompt
_PER_PROMPT = ("running", "finished", "running_scores", "finished_scores", "is_finished", "can_improve", "hits_stop",
               "running_origin", "finished_origin", "prompt_at", "stop_lengths")
_PER_STEP = ("running", "finished", "running_origin", "finished_origin")  # their last dimension grows
_PER_PROMPT_LISTS = ("lengths", "prompt_lens", "max_lengths")  # per prompt, as Python ints
GROWTH = 64  # steps the sequence buffers hold at first; they double when full


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor [batch, beams, ...], indices [batch, k] -> [batch, k, ...]."""
    if tensor.dim() == 2:
        return torch.take_along_dim(tensor, indices, dim=1)
    # whole rows: one index_select over [batch * beams, ...] copies them 4x faster than a gather's expanded index
    batch, beams = tensor.shape[:2]
    rows = indices + torch.arange(0, batch * beams, beams, device=indices.device)[:, None]
    return tensor.flatten(0, 1).index_select(0, rows.flatten()).view(batch, indices.shape[1], *tensor.shape[2:])


class BeamSearch:
    def __init__(self, input_ids: torch.Tensor, params: SamplingParams, eos: torch.Tensor | None,
                 stop_length: int | None = None):
        """input_ids: [batch * beams, L]; eos: [num_eos] or None; stop_length: the max-length stopping
        criterion's limit (None: there is none)."""
        beams, device = params.num_beams, input_ids.device
        self.params = params
        self.batch = input_ids.shape[0] // beams
        length = input_ids.shape[1]
        self.lengths = [length] * self.batch  # per prompt: tokens of its running beams
        self.prompt_lens = [length] * self.batch  # per prompt: its width, where its generated tokens start
        self.max_lengths = [params.max_length] * self.batch  # per prompt: the generation config's limit
        self.prompt_at = torch.full((self.batch, 1, 1), length, device=device)  # prompt_lens as a tensor
        # per prompt: the length at which the max-length criterion stops a candidate
        self.stop_lengths = torch.full((self.batch,), torch.iinfo(torch.long).max if stop_length is None else
                                       stop_length, device=device)
        self._lengths: tuple[list[int] | None, torch.Tensor | None] = (None, None)  # (lengths, as a tensor [batch])
        self.num_candidates = max(2, 1 + (0 if eos is None else eos.shape[0])) * beams
        self.is_top_beam = torch.arange(self.num_candidates, device=device) < beams  # [K]
        # transformers fills unwritten positions with `pad or eos[0]`: a pad id of 0 falls through to eos
        self.fill = (params.pad_token_id or int(eos[0])) if eos is not None else -1
        # sequences and backpointers are sized for the steps taken so far, and grow (max_length is only a limit)
        self.running = torch.full((self.batch, beams, length + GROWTH), self.fill, dtype=torch.long, device=device)
        self.running[:, :, :length] = input_ids.view(self.batch, beams, -1)
        self.finished = self.running.clone()
        # only the first beam of each prompt is live at the start, so the first step does not pick duplicates
        self.running_scores = torch.zeros((self.batch, beams), dtype=torch.float32, device=device)
        self.running_scores[:, 1:] = NEG
        self.finished_scores = torch.full((self.batch, beams), NEG, dtype=torch.float32, device=device)
        self.is_finished = torch.zeros((self.batch, beams), dtype=torch.bool, device=device)
        self.can_improve = torch.ones((self.batch, 1), dtype=torch.bool, device=device)
        self.hits_stop = torch.zeros((self.batch, self.num_candidates), dtype=torch.bool, device=device)
        self.running_origin = torch.full((self.batch, beams, GROWTH), -1, dtype=torch.int32, device=device)
        self.finished_origin = self.running_origin.clone()
        self.prompts = list(range(self.batch))  # the prompts of the caller's batch that this search holds

    def running_sequences(self) -> list[list[int]]:  # per running beam [batch * beams]: its tokens
        ends = [n for n in self.lengths for _ in range(self.params.num_beams)]
        return [row[:n] for row, n in zip(self.running.flatten(0, 1).tolist(), ends)]

    def whole(self) -> "BeamSearch":
        """Itself (a request's part of a joined search is split off when read: `beam_replay.SplitLater`)."""
        return self

    def same_length(self) -> bool:
        return all(n == self.lengths[0] for n in self.lengths)

    def tail(self, count: int) -> torch.Tensor:  # [batch * beams, count]: each running beam's last `count` tokens
        return self.running.gather(2, self._position(-count + torch.arange(count, device=self.running.device))
                                   .expand(-1, self.params.num_beams, -1)).flatten(0, 1)

    def _position(self, offset) -> torch.Tensor:  # [batch, 1, n]: each prompt's length + offset ([n] or int)
        if self._lengths[0] is not self.lengths:  # (the list is replaced, never changed in place)
            self._lengths = self.lengths, as_tensor(self.lengths, self.running.device)
        return (self._lengths[1][:, None] + offset).view(self.batch, 1, -1)

    def _per_length(self, fn: Callable[[int, slice | list[int]], torch.Tensor]) -> torch.Tensor:  # -> [batch, ...]
        """fn(length, index) over the prompts of each distinct length (index: slice(None) when that is all of
        them, else their indices), assembled over the batch."""
        if self.same_length():
            return fn(self.lengths[0], slice(None))
        by_length = defaultdict(list)
        for g, n in enumerate(self.lengths):
            by_length[n].append(g)
        parts = [(index, fn(n, index)) for n, index in by_length.items()]
        out = parts[0][1].new_empty((self.batch, *parts[0][1].shape[1:]))
        for index, part in parts:
            out[index] = part
        return out

    def _penalised(self, generated: list[int]) -> torch.Tensor:  # [batch, 1] float32
        """Per prompt, its generated length ** length_penalty, computed in Python doubles as transformers computes
        it: a float32 tensor divided by these divides exactly as by each Python float."""
        penalty = self.params.length_penalty
        return as_tensor([n**penalty for n in generated], self.running.device, np.float32)[:, None]

    def _ids(self, index: slice | list[int]) -> list[int]:
        """The caller's prompts at these indices."""
        return self.prompts[index] if isinstance(index, slice) else [self.prompts[g] for g in index]

    def step(self, log_probs: torch.Tensor, stop: StopCheck,
             history: Callable[[list[int]], tuple | None]) -> TraceStep:
        """log_probs: [batch * beams, vocab], processed; stop: the request's stopping criteria; history(prompts): the
        scores the criteria get for those of the caller's prompts. Returns what happened, for the trace; afterwards
        `parents()` names the previous running beam of every new one."""
        beams, batch = self.params.num_beams, self.batch
        steps = max(n - start for n, start in zip(self.lengths, self.prompt_lens))
        if max(self.lengths) == self.running.shape[-1] or steps == self.running_origin.shape[-1]:
            self._grow()
        total = log_probs.view(batch, beams, -1) + self.running_scores[:, :, None]
        vocab = total.shape[-1]
        cand_scores, flat = torch.topk(total.view(batch, -1), k=self.num_candidates)
        candidates = _Candidates(self, flat // vocab, flat % vocab)
        hits = self._stops(stop, history, candidates)
        self.hits_stop = hits

        # the best B candidates that do not stop run on
        live_scores = cand_scores + hits.to(torch.float32) * NEG
        survivors = torch.topk(live_scores, k=beams)[1]
        entered = self._update_finished(candidates, cand_scores, hits)  # (reads the running beams before this step)
        self.running, self.running_origin = candidates.rows(survivors)
        self.running_scores = _gather(live_scores, survivors)
        self.lengths = [n + 1 for n in self.lengths]
        self._update_can_improve()
        return TraceStep(candidates.beam, candidates.token, cand_scores, survivors, entered)

    def _stops(self, stop: StopCheck, history, candidates: "_Candidates") -> torch.Tensor:  # [batch, K] bool
        """The criteria on every candidate: read off its length and token where they are transformers' max-length
        and eos criteria alone, else called on the candidates' sequences as transformers calls them."""
        if not stop.others:
            return stop.hits(candidates.token, self._position(1)[:, 0, 0], self.stop_lengths)
        sequences, k = candidates.rows()[0], self.num_candidates
        return self._per_length(lambda n, index: stop.criteria(
            sequences[index, :, : n + 1].flatten(0, 1), history(self._ids(index))).view(-1, k))

    def _grow(self) -> None:
        """Double the room for steps: sequences padded with the fill token, backpointers with -1."""
        room = self.running_origin.shape[-1]
        pad = torch.nn.functional.pad
        self.running, self.finished = (pad(t, (0, room), value=self.fill) for t in (self.running, self.finished))
        self.running_origin, self.finished_origin = (pad(t, (0, room), value=-1) for t in
                                                     (self.running_origin, self.finished_origin))

    def parents(self) -> torch.Tensor:  # [batch * beams]: flat index of each running beam's parent
        at = (self._position(-1) - self.prompt_at).expand(-1, self.params.num_beams, -1)
        local = self.running_origin.gather(2, at)[..., 0].long()
        return (local + torch.arange(self.batch, device=local.device)[:, None] * self.params.num_beams).flatten()

    def prompts_done(self) -> torch.Tensor:  # [batch] bool
        """Per prompt, transformers' stopping rule as if it were searched alone: nothing can improve, or the
        hypotheses are full under early_stopping=True, or every candidate hit a stopping criterion."""
        return ~(self.can_improve[:, 0] & ~self._full() & ~self.hits_stop.all(dim=1))

    def _full(self) -> torch.Tensor:  # [batch] bool
        """early_stopping=True: a prompt whose finished hypotheses are all set takes no more."""
        return self.is_finished.all(dim=1) & (self.params.early_stopping is True)

    def split(self, keep: list[int]) -> "BeamSearch":
        """A search over the prompts `keep` (indices into this one's batch), their state as it is now (views of
        it where `keep` is a run of consecutive prompts: no state tensor is ever written in place)."""
        other = copy.copy(self)
        if keep == list(range(keep[0], keep[0] + len(keep))):
            for name in _PER_PROMPT:
                setattr(other, name, getattr(self, name)[keep[0]:keep[0] + len(keep)])
        else:
            index = as_tensor(keep, self.running.device)
            for name in _PER_PROMPT:
                setattr(other, name, getattr(self, name).index_select(0, index))
        other.batch, other.prompts = len(keep), [self.prompts[i] for i in keep]
        for name in _PER_PROMPT_LISTS:
            setattr(other, name, [getattr(self, name)[i] for i in keep])
        return other

    @staticmethod
    def merge(parts: list["BeamSearch"], prompts: list | None = None) -> "BeamSearch":
        """One search over the prompts of `parts`: splits of one search, in the caller's prompt order; or, given
        `prompts` (ids for all of theirs, in order), the searches of several requests of one kind, joined to
        step together."""
        if prompts is None and len(parts) == 1 and parts[0].prompts == sorted(parts[0].prompts):
            return parts[0]  # (a plain round's, as a rule: every prompt left its trees at the same step)
        parts = [part.whole() for part in parts]
        merged = copy.copy(parts[0])
        for name in _PER_PROMPT:
            tensors = [getattr(p, name) for p in parts]
            if name in _PER_STEP:  # sized for the steps taken so far: padded to the widest
                wide = max(t.shape[-1] for t in tensors)
                fill = -1 if name.endswith("origin") else merged.fill
                tensors = [torch.nn.functional.pad(t, (0, wide - t.shape[-1]), value=fill) for t in tensors]
            setattr(merged, name, torch.cat(tensors))
        for name in _PER_PROMPT_LISTS:
            setattr(merged, name, [n for p in parts for n in getattr(p, name)])
        merged.batch = sum(p.batch for p in parts)
        if prompts is not None:
            merged.prompts = prompts
            return merged
        merged.prompts = [g for p in parts for g in p.prompts]
        order = sorted(range(merged.batch), key=merged.prompts.__getitem__)
        return merged.split(order) if order != list(range(merged.batch)) else merged

    def kind(self) -> tuple:
        """What two searches must share to step as one: the same parameters but for each prompt's limits."""
        return (replace(self.params, max_length=0, num_return_sequences=1), self.num_candidates, self.fill,
                self.running.device)

    def _update_finished(self, candidates: "_Candidates", cand_scores, hits) -> torch.Tensor:
        """Merge the candidates that stopped among the top B into the best B finished hypotheses."""
        beams = self.params.num_beams
        just_finished = hits & self.is_top_beam[None, :]
        if not bool(just_finished.any()):
            # nothing enters: every candidate scores below the set's hypotheses and at most ties its placeholders
            # (score NEG, not finished), and which of those a tie keeps is read by nothing, results included
            return torch.zeros_like(hits)
        scores = cand_scores / self._penalised([n + 1 - start for n, start in zip(self.lengths, self.prompt_lens)])
        scores = scores + self._full()[:, None].to(torch.float32) * NEG  # early_stopping=True: full takes no more
        scores = scores + (~self.can_improve).to(torch.float32) * NEG  # nothing can beat the set
        scores = scores + (~just_finished) * NEG  # still running: not a hypothesis
        merged_scores = torch.cat((self.finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, k=beams)[1]
        if not torch.equal(best, torch.arange(beams, device=best.device).expand_as(best)):
            # (else each gather below would give back what it gathers from: the set as it was)
            self.finished, self.finished_origin = self._merged_rows(candidates, best)
            self.finished_scores = _gather(merged_scores, best)
            self.is_finished = _gather(torch.cat((self.is_finished, just_finished), dim=1), best)
        # which candidates entered: merged index beams + k is candidate k; older hypotheses go to a dummy
        # column, and so do the placeholders that pad the set while fewer than B hypotheses have finished
        entered = torch.zeros((self.batch, self.num_candidates + 1), dtype=torch.bool, device=best.device)
        entered.scatter_(1, (best - beams + 1).clamp(min=0), (best >= beams) & self.is_finished)
        return entered[:, 1:]

    def _merged_rows(self, candidates: "_Candidates", best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """best [batch, B]: indices into (the finished hypotheses, then the K candidates) -> their sequences and
        backpointers, each row gathered from where it lies, without concatenating the two."""
        beams = self.params.num_beams
        kept = (best < beams)[..., None]  # [batch, B, 1]: a finished hypothesis stays
        old, entering = best.clamp(max=beams - 1), candidates.rows((best - beams).clamp(min=0))
        return (torch.where(kept, _gather(self.finished, old), entering[0]),
                torch.where(kept, _gather(self.finished_origin, old), entering[1]))

    def _update_can_improve(self) -> None:
        """transformers' early-stopping heuristic: can a prompt's running beams still beat its worst finished
        hypothesis? (`prompts_done` then applies its stopping rule.)"""
        params = self.params
        longest = params.early_stopping == "never" and params.length_penalty > 0.0
        best_running = self.running_scores[:, :1] / self._penalised(
            [(limit if longest else n) - start for n, start, limit in zip(self.lengths, self.prompt_lens,
                                                                           self.max_lengths)])
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(dim=1, keepdim=True)[0], NEG)
        self.can_improve = self.can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best `num_return_sequences` hypotheses: sequences [batch * n, length], scores [batch * n],
        beam indices within each prompt [batch * n, generated] (-1 padded), cropped as transformers crops them."""
        n = self.params.num_return_sequences
        sequences = self.finished[:, :n].flatten(0, 1)
        scores = self.finished_scores[:, :n].flatten()
        origin = self.finished_origin[:, :n].flatten(0, 1)
        generated = int((origin + 1).bool().sum(dim=1).max())
        return sequences[:, : max(self.prompt_lens) + generated], scores, origin[:, :generated]


class _Candidates:
    """A step's K candidates per prompt (their source beams and tokens [batch, K]), whose sequences and
    backpointers are gathered only for the candidates asked for: the B running beams every step, the entering
    hypotheses when the finished set changes, all K only for stopping criteria that read them."""

    def __init__(self, search: BeamSearch, beam: torch.Tensor, token: torch.Tensor):
        self.search, self.beam, self.token = search, beam, token

    def rows(self, pick: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """pick [batch, n]: candidate indices (None: all K) -> their sequences [batch, n, width] and backpointers
        [batch, n, steps], the new token and its source beam written at each prompt's length."""
        search = self.search
        beam, token = self.beam, self.token
        if pick is not None:
            beam, token = beam.gather(1, pick), token.gather(1, pick)
        at = search._position(0).expand(-1, beam.shape[1], -1)  # [batch, n, 1]
        sequences = _gather(search.running, beam)
        sequences.scatter_(2, at, token[..., None])
        origins = _gather(search.running_origin, beam)
        # the beam within its prompt (a search may be split by prompt)
        origins.scatter_(2, at - search.prompt_at, beam[..., None].to(origins.dtype))
        return sequences, origins
