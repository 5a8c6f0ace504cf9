"""TEMPORARY: the step-based core's interface (`engine.loop`, `engine.core`, `RequestOutput`) faked on today's
`Engine.generate`, so that the server can be written and tested before the core lands. One worker thread runs
the queued requests one at a time: a single greedy or sampled row streams its tokens as they come, anything
else arrives all at once when it finishes. Drop this file when the core is merged."""
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from specbeam.config import BEAM
from specbeam.engine import Engine as _Engine
from specbeam.request import build_request


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[list[int]]
    new_logits: list[torch.Tensor] | None = None
    finished: bool = False
    aborted: bool = False
    result: object | None = None
    error: Exception | None = None


class _Aborted(Exception):
    """Raised inside `generate` (from a stopping criterion) to stop an aborted request; its blocks go back in
    the scheduler's `finally`."""


class _AbortCheck(StoppingCriteria):
    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # [rows] bool
        if self.flag.is_set():
            raise _Aborted
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _Streamer:
    """transformers' streamer protocol: the prompt first (skipped), then the new tokens of the single row."""

    def __init__(self, job: "_Job"):
        self.job, self.prompt_seen = job, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = value.flatten().tolist()
        self.job.streamed += len(tokens)
        self.job.on_output(RequestOutput(self.job.request_id, [tokens]))

    def end(self) -> None:
        pass


@dataclass
class _Job:
    request_id: str
    input_ids: torch.Tensor  # [1, L]
    on_output: object
    kwargs: dict
    streams: bool
    aborted: threading.Event = field(default_factory=threading.Event)
    streamed: int = 0


class ShimCore:
    """`engine.core.metrics()` from the engine's one cache and the stats of the requests run so far."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.waiting = self.running = 0
        self.accepted_by_depth: list[int] = []
        self.drafted_tokens = 0

    def record(self, stats) -> None:
        if stats is None:
            return
        self.drafted_tokens += stats.drafted_tokens
        depths = list(itertools.zip_longest(self.accepted_by_depth, stats.accepted_by_depth, fillvalue=0))
        self.accepted_by_depth = [a + b for a, b in depths]

    def metrics(self) -> dict:
        cache = self.engine.cache
        total = 0 if cache is None else cache.allocator.num_blocks
        return {"kv_blocks_total": total, "kv_blocks_used": 0 if cache is None else total - cache.allocator.num_free,
                "requests_waiting": self.waiting, "requests_running": self.running,
                "accepted_by_depth": list(self.accepted_by_depth), "drafted_tokens": self.drafted_tokens}


class ShimLoop:
    def __init__(self, engine: "Engine", core: ShimCore):
        self.engine, self.core = engine, core
        self.queue: deque[_Job] = deque()
        self.jobs: dict[str, _Job] = {}
        self.wake = threading.Condition()
        self.closed = False
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self._work, name="specbeam-shim-loop", daemon=True)
        self.thread.start()

    def submit(self, input_ids: torch.Tensor, on_output, **generate_kwargs) -> str:
        request = self._validate(input_ids, generate_kwargs)
        params = request.params
        streams = params.mode != BEAM and params.rows_per_prompt == 1 and not generate_kwargs.get("output_logits")
        job = _Job(f"shim-{next(self.ids)}", input_ids, on_output, generate_kwargs, streams)
        with self.wake:
            if self.closed:
                raise RuntimeError("the engine loop is closed")
            self.jobs[job.request_id] = job
            self.queue.append(job)
            self.core.waiting = len(self.queue)
            self.wake.notify()
        return job.request_id

    def abort(self, request_id: str) -> None:
        with self.wake:
            job = self.jobs.get(request_id)
            if job is not None:
                job.aborted.set()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            for job in self.jobs.values():
                job.aborted.set()
            self.wake.notify()
        self.thread.join()

    def _validate(self, input_ids, kwargs):
        """What `Engine.generate` checks before any work."""
        kwargs = dict(kwargs)
        generator = kwargs.pop("generator", None)
        request = build_request(self.engine.runner.model, input_ids, None, None, None, {}, kwargs)
        self.engine._check_request(request, None, generator, speculative=self.engine.drafter is not None)
        return request

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.queue and not self.closed:
                    self.wake.wait()
                if not self.queue:
                    return
                job = self.queue.popleft()
                self.core.waiting, self.core.running = len(self.queue), 1
            try:
                self._run(job)
            finally:
                with self.wake:
                    self.core.running = 0
                    del self.jobs[job.request_id]

    def _run(self, job: _Job) -> None:
        if job.aborted.is_set():
            return job.on_output(RequestOutput(job.request_id, [], finished=True, aborted=True))
        criteria = StoppingCriteriaList([_AbortCheck(job.aborted)])
        streamer = _Streamer(job) if job.streams else None
        try:
            result = self.engine.generate(job.input_ids, stopping_criteria=criteria, streamer=streamer, **job.kwargs)
        except _Aborted:
            return job.on_output(RequestOutput(job.request_id, [], finished=True, aborted=True))
        except Exception as error:  # noqa: BLE001 - handed to the caller, as the core does
            return job.on_output(RequestOutput(job.request_id, [], finished=True, error=error))
        self.core.record(getattr(result, "stats", None))
        job.on_output(self._final(job, result))

    def _final(self, job: _Job, result) -> RequestOutput:
        """The tokens not streamed yet (and their logits), with the result."""
        start = job.input_ids.shape[1] + job.streamed
        rows = [row[start:].tolist() for row in result.sequences]
        logits = None
        if result.logits is not None and job.kwargs.get("num_beams", 1) == 1:
            steps = torch.stack(result.logits, dim=1)  # [rows, steps, vocab]
            logits = [steps[r, job.streamed:] for r in range(steps.shape[0])]
        return RequestOutput(job.request_id, rows, logits, finished=True, result=result)


class Engine(_Engine):
    """`specbeam.Engine` with the shim's `loop` and `core`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.core = ShimCore(self)
        self.loop = ShimLoop(self, self.core)
