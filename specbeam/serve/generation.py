"""One request from its place in the server's queue to its last token: admitted, submitted to the engine,
its outputs turned into row deltas; when it ends (or its client leaves) the engine's work is aborted, its
place released, and it is counted and logged once."""
import logging
import time
from collections.abc import AsyncIterator

import torch

from specbeam.cli.runs import format_acceptance
from specbeam.serve.admission import QueueFull
from specbeam.serve.bridge import Handle
from specbeam.serve.disconnect import race
from specbeam.serve.engine_api import RequestOutput
from specbeam.serve.errors import ApiError, engine_error
from specbeam.serve.params import Plan
from specbeam.serve.rows import Row, RowDelta

log = logging.getLogger("specbeam.serve")


class Generation:
    def __init__(self, server, request_id: str, prompt_ids: list[int], plan: Plan):
        self.server, self.id, self.prompt_ids, self.plan = server, request_id, prompt_ids, plan
        rules = server.text_rules(plan.stops)
        self.rows = [Row(i, rules, plan.logprobs) for i in range(plan.n)]
        self.created = int(time.time())
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.handle: Handle | None = None
        self.admitted = False
        self.state: str | None = None  # finished, aborted, failed; None while it runs
        self.stats = None
        self.recorded = False

    @property
    def completion_tokens(self) -> int:
        return sum(row.completion_tokens for row in self.rows)

    async def start(self, gone) -> None:
        """Waits for a place, then submits: a full queue is a 503, the engine's refusal a 400."""
        try:
            await race(self.server.admission.acquire(self.plan.rows), gone)
            self.admitted = True
            self.handle = self.server.submit(self.prompt_ids, self.plan.kwargs)
        except QueueFull as error:
            self.recorded = True  # the error handler counts it
            raise ApiError(503, f"the server is busy: {error}; retry later", code="queue_full", state="rejected",
                           headers={"Retry-After": "1"}) from error
        except ApiError:
            self.recorded = True
            raise

    async def deltas(self, gone) -> AsyncIterator[list[RowDelta]]:
        """The rows' deltas of each engine output, until the last."""
        while self.state is None:
            deltas = self._apply(await race(self.handle.next(), gone))
            if deltas:
                yield deltas

    def _apply(self, out: RequestOutput) -> list[RowDelta]:
        if out.aborted:
            self.state = "aborted"
            raise ApiError(503, "the request was aborted: the server is shutting down", code="aborted", state=None)
        if out.error is not None:
            self.state = "failed"
            raise engine_error(out.error, state=None)
        if out.finished:
            self.state = "finished"
            self.stats = getattr(out.result, "stats", None)
            deltas = [row.finish(tokens, logits) for row, (tokens, logits) in
                      zip(self.rows, _result_rows(out.result, len(self.prompt_ids)))]
        else:
            logits = out.new_logits or [None] * len(out.new_token_ids)
            deltas = [row.extend(tokens, row_logits) for row, tokens, row_logits in
                      zip(self.rows, out.new_token_ids, logits) if tokens]
        if self.first_token_at is None and any(row.tokens for row in self.rows):
            self.first_token_at = time.perf_counter()
        return [d for d in deltas if d is not None]

    def close(self) -> None:
        """Stops the engine's work if it still runs, gives the place back, counts and logs the request."""
        if self.handle is not None and self.state is None:
            self.server.engine.loop.abort(self.handle.request_id)
            self.state = "aborted"
        if self.admitted:
            self.server.admission.release(self.plan.rows)
            self.admitted = False
        if not self.recorded:
            self.recorded = True
            self._record(self.state or "aborted", time.perf_counter())

    def _record(self, state: str, now: float) -> None:
        metrics, seconds = self.server.metrics, now - self.arrived
        metrics.count(state)
        metrics.prompt_tokens.inc(len(self.prompt_ids))
        metrics.generation_tokens.inc(self.completion_tokens)
        if state == "finished":
            metrics.e2e.observe(seconds)
            longest = max(row.completion_tokens for row in self.rows)
            if self.first_token_at is not None:
                metrics.ttft.observe(self.first_token_at - self.arrived)
                if longest > 1:
                    metrics.per_token.observe((now - self.first_token_at) / (longest - 1))
        acceptance = "-" if self.stats is None else format_acceptance(
            self.stats.mean_accepted(), self.stats.acceptance_by_depth())
        log.info("%s %s %s prompt=%d generated=%d %.3fs accepted %s", self.id, state, self.plan.mode,
                 len(self.prompt_ids), self.completion_tokens, seconds, acceptance)


def _result_rows(result, prompt_len: int) -> list[tuple[list[int], torch.Tensor | None]]:
    """Each returned sequence's new tokens and the raw logits each was chosen from [steps, vocab] (None
    without output_logits). Beam search: a sequence's step t came from beam `beam_indices[row, t]`."""
    sequences = result.sequences[:, prompt_len:].tolist()
    if result.logits is None:
        return [(tokens, None) for tokens in sequences]
    steps = torch.stack(result.logits, dim=1)  # [batch rows, steps, vocab]
    beam_indices = getattr(result, "beam_indices", None)
    if beam_indices is None:
        return [(tokens, steps[r]) for r, tokens in enumerate(sequences)]
    length = min(beam_indices.shape[1], steps.shape[1])
    beams = beam_indices[:, :length].clamp(min=0)  # [rows, length]; -1 past a sequence's end
    return [(tokens, steps[beams[r], torch.arange(length)]) for r, tokens in enumerate(sequences)]
