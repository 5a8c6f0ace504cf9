"""The decoding loop over one request's sequences: prefill the prompts once, then step every running
sequence together through one packed target forward per step. Every block is released at the end,
whatever happens."""
import torch
import torch.nn.functional as F

from specbeam.beam import BeamSearch
from specbeam.cache import BlockTable, PagedKVCache
from specbeam.config import BEAM, SAMPLE
from specbeam.model_runner import ModelRunner
from specbeam.outputs import SpecbeamBeamOutput, SpecbeamOutput
from specbeam.stats import DecodeStats
from specbeam.request import Request
from specbeam.trace import Trace
from specbeam.validation import check_finite


class Scheduler:
    def __init__(self, runner: ModelRunner, cache: PagedKVCache, request: Request, streamer=None, generator=None):
        self.runner, self.cache, self.request = runner, cache, request
        self.streamer, self.generator = streamer, generator
        self.stats = DecodeStats()
        self.tables: list[BlockTable] = []

    def run(self):
        try:
            if self.request.params.mode == BEAM:
                return self._decode_beams()
            return self._decode_tokens()
        except FloatingPointError:
            self.cache.pool.zero_()  # the model wrote non-finite K/V: keep them from any later request
            raise
        finally:
            for table in self.tables:
                self.cache.release(table)
            self.stats.kv_blocks_peak = self.cache.allocator.peak_used
            self.stats.kv_bytes_peak = self.cache.allocator.peak_used * self.cache.block_bytes

    # --- phases -----------------------------------------------------------------------------------------

    def _prefill(self, with_last: bool = True) -> torch.Tensor | None:  # [rows, vocab] float32
        """Run each prompt once, then fork its blocks to the prompt's rows (beams or samples); returns each
        row's next-token logits. Without its last token (`with_last=False`), which then roots the first
        draft tree so that the first new token is speculated too, nothing is returned."""
        rows = self.request.params.rows_per_prompt
        prompt_tables = [BlockTable() for _ in self.request.prompts]
        self.tables = prompt_tables
        tokens = [p if with_last else p[:-1] for p in self.request.prompts]
        run = [i for i, t in enumerate(tokens) if len(t)]
        logits = self._forward([prompt_tables[i] for i in run], [tokens[i] for i in run]) if run else None
        self.tables = [self.cache.fork(t) for t in prompt_tables for _ in range(rows)]
        for table in prompt_tables:
            self.cache.release(table)
        return logits.repeat_interleave(rows, dim=0) if with_last else None

    def _history(self, scores: list):
        """What stopping criteria get as `scores`: the processed scores so far when the caller keeps them
        (output_scores), else None, as transformers passes them."""
        return tuple(scores) if self.request.config.output_scores else None

    def _forward(self, tables, tokens) -> torch.Tensor:  # [len(tables), vocab] float32
        self.stats.target_passes += 1
        logits = self.runner.forward(self.cache, tables, tokens)
        return logits.to(dtype=torch.float32)

    def _step_rows(self, rows: torch.Tensor, tokens: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Advance the sequences `rows` [R] by `tokens` [num_rows]; rows not advanced get `fill` [vocab]."""
        logits = fill.expand(tokens.shape[0], -1).clone()
        row_list = rows.tolist()
        if row_list:
            tables = [self.tables[r] for r in row_list]
            logits[rows] = self._forward(tables, [tokens[r : r + 1] for r in row_list])
        return logits

    # --- greedy and sampling ------------------------------------------------------------------------------

    def _decode_tokens(self) -> SpecbeamOutput:
        request = self.request
        pad = request.params.pad_token_id
        sequences = request.input_ids
        unfinished = torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        has_eos = any(hasattr(c, "eos_token_id") for c in request.stopping_criteria)
        scores, raw = [], []
        if self.streamer is not None:
            self.streamer.put(sequences.cpu())
        logits = self._prefill()
        finished_logits = _one_hot_logits(pad, logits.shape[1], logits.device)
        while True:
            check_finite(logits[unfinished], self.stats.steps)
            processed = request.logits_processor(sequences, logits)
            scores.append(processed)
            raw.append(logits)
            tokens = self._choose(processed)
            if has_eos:
                tokens = torch.where(unfinished, tokens, pad)
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
            self.stats.steps += 1
            if self.streamer is not None:
                self.streamer.put(tokens.cpu())
            unfinished = unfinished & ~request.stopping_criteria(sequences, self._history(scores))
            if not bool(unfinished.any()):
                break
            logits = self._step_rows(unfinished.nonzero()[:, 0], tokens, finished_logits)
        return self._token_output(sequences, scores, raw)

    def _token_output(self, sequences: torch.Tensor, scores: list, raw: list):
        config = self.request.config
        if self.streamer is not None:
            self.streamer.end()
        if not config.return_dict_in_generate:
            return sequences
        return SpecbeamOutput(
            sequences=sequences,
            scores=tuple(scores) if config.output_scores else None,
            logits=tuple(raw) if config.output_logits else None,
            stats=self.stats,
        )

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:  # [rows, vocab] -> [rows]
        if self.request.params.mode == SAMPLE:
            probs = F.softmax(scores, dim=-1)
            return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
        return torch.argmax(scores, dim=-1)

    # --- beam search --------------------------------------------------------------------------------------

    def _decode_beams(self) -> SpecbeamBeamOutput:
        request = self.request
        search = BeamSearch(request.input_ids, request.params, request.config._eos_token_tensor)
        trace, scores, raw = Trace(), [], []
        logits = self._prefill()
        while True:
            self._beam_step(search, logits, trace, scores, raw)
            if search.done:
                break
            self._reorder(search.parents())
            tokens = search.running_sequences()[:, -1]
            logits = self._step_rows(self._active_beams(search).nonzero()[:, 0], tokens, self._frozen_beam_logits())
        return self._beam_output(search, trace, scores, raw)

    def _beam_step(self, search: BeamSearch, logits: torch.Tensor, trace: Trace, scores: list, raw: list) -> None:
        """One beam step from the running beams' next-token logits [rows, vocab]."""
        check_finite(logits, self.stats.steps)
        processors = self.request.logits_processor
        log_probs = processors(search.running_sequences(), F.log_softmax(logits, dim=-1))
        raw.append(logits)
        scores.append(log_probs)
        trace.steps.append(search.step(log_probs, self.request.stopping_criteria, self._history(scores)))
        self.stats.steps += 1

    def _frozen_beam_logits(self) -> torch.Tensor:  # [vocab]
        """What a beam of a prompt that can no longer change steps on, uncomputed: uniform logits."""
        return torch.zeros(self.runner.vocab_size, device=self.runner.device)

    def _active_beams(self, search: BeamSearch) -> torch.Tensor:  # [rows] bool
        return search.active_prompts().repeat_interleave(self.request.params.num_beams)

    def _beam_output(self, search: BeamSearch, trace: Trace, scores: list, raw: list):
        config = self.request.config
        sequences, sequence_scores, beam_indices = search.results()
        if not config.return_dict_in_generate:
            return sequences
        trace.mark_returned(sequences, beam_indices, search.prompt_len)
        return SpecbeamBeamOutput(
            sequences=sequences,
            sequences_scores=sequence_scores if config.output_scores else None,
            scores=tuple(scores) if config.output_scores else None,
            logits=tuple(raw) if config.output_logits else None,
            beam_indices=beam_indices,
            trace=trace,
            stats=self.stats,
        )

    def _reorder(self, parents: torch.Tensor) -> None:  # [rows]: each new beam's previous beam
        """New beams fork their parents' blocks; the old tables are then released."""
        old = self.tables
        self.tables = [self.cache.fork(old[p]) for p in parents.tolist()]
        for table in old:
            self.cache.release(table)


def _one_hot_logits(pad: int | None, vocab: int, device) -> torch.Tensor:  # [vocab]
    """Logits of a finished sequence: it can only emit padding."""
    logits = torch.full((vocab,), float("-inf"), device=device)
    if pad is not None and 0 <= pad < vocab:
        logits[pad] = 0.0
    return logits
