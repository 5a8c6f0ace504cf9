"""One thread that steps an `EngineCore` while it has work, so that callers on any thread (`Engine.generate`,
the server) share its forwards: each submits a request with a callback and gets that request's outputs."""
import logging
import threading
import weakref
from typing import Callable

from specbeam.engine.core import EngineCore
from specbeam.engine.decoding import Decoding
from specbeam.outputs import RequestOutput

log = logging.getLogger("specbeam")


class EngineLoop:
    def __init__(self, core: EngineCore):
        self.core = core
        self.callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False

    def submit(self, input_ids, on_output: Callable[[RequestOutput], None], **generate_kwargs) -> str:
        """Validate (raising ValueError / TypeError in the caller's thread, before any work) and queue a
        `generate` call; `on_output` gets its outputs, from the loop's thread."""
        return self.submit_state(self.core.prepare(input_ids, **generate_kwargs), on_output)

    def submit_state(self, state: Decoding, on_output: Callable[[RequestOutput], None]) -> str:
        with self.wake:
            if self.closed:
                raise RuntimeError("the engine loop is closed")
            request_id = self.core.add(state)
            self.callbacks[request_id] = on_output
            if self.thread is None:
                self.thread = threading.Thread(target=_run, args=(weakref.ref(self), self.wake),
                                               name="specbeam-engine", daemon=True)
                self.thread.start()
            self.wake.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request: its blocks are free after the loop's next step, and its callback hears it ended."""
        self.core.abort(request_id)
        with self.wake:
            self.wake.notify()

    def close(self) -> None:
        """Abort what runs and stop the thread."""
        with self.wake:
            self.closed = True
            for request_id in list(self.callbacks):
                self.core.abort(request_id)
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def _step(self) -> None:
        """One step of the core; a step that breaks fails the requests it held, and the loop goes on."""
        try:
            outputs = self.core.step()
        except Exception as error:  # noqa: BLE001
            log.exception("specbeam: an engine step failed; failing the requests it held")
            outputs = self.core.fail_all(error)
        for output in outputs:
            self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        with self.wake:
            callback = (self.callbacks.pop if output.finished else self.callbacks.get)(output.request_id, None)
        if callback is None:
            return
        try:
            callback(output)
        except Exception:  # a caller's callback must not stop everyone's loop
            log.exception("specbeam: the output callback of %s failed; aborting it", output.request_id)
            self.core.abort(output.request_id)


def _run(loop_ref: "weakref.ref[EngineLoop]", wake: threading.Condition) -> None:
    """The loop's thread. While idle it holds its loop only weakly, so that an engine nobody uses any more is
    garbage collected with its pools (the thread then waits for ever: a thread that ran OpenMP regions must not
    end before the process does)."""
    while True:
        with wake:
            while True:
                loop = loop_ref()
                if loop is not None and (loop.core.has_unfinished_requests() or loop.closed):
                    break
                del loop
                wake.wait()
        if loop.closed and not loop.core.has_unfinished_requests():
            return
        loop._step()
        del loop
