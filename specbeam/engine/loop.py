"""Steps an `EngineCore` for callers on any thread, so that they share its forwards: each submits a request with
a callback and gets that request's outputs.

The thread that steps is one that would wait anyway: a `generate` caller waiting for its own result (the first
to find nobody stepping; when its request ends, another waiting caller takes over), or a thread given to the
loop for good (`run_forever`: the server's main thread). Only a request submitted with nobody to step it (an
application served by someone else's uvicorn) makes the loop start a thread of its own.

Why not always a thread of the loop's own: the C++ kernels' OpenMP team belongs to the thread that opens it.
The caller's thread has one already (it loaded the model); a second thread opens a second team, and libgomp,
seeing more threads than cores, stops spinning between parallel regions, so that each region wakes its workers
through the kernel (~0.1 ms on a virtual machine): at 2 threads that made the shipped target's decode step 3x
slower and a 246M target's 1.6x. A thread other than the main one that does step (one of several callers) runs
torch's own operations serially (`ops.serial_torch_ops`), the C++ kernels on specbeam's worker team."""
import logging
import threading
from typing import Callable

from specbeam import ops
from specbeam.engine.core import EngineCore
from specbeam.engine.decoding import Decoding
from specbeam.outputs import RequestOutput

log = logging.getLogger("specbeam")


class EngineLoop:
    def __init__(self, core: EngineCore):
        self.core = core
        self.callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self.wake = threading.Condition()  # notified on new work, a finished request, a turn given back, close
        self.stepping = False  # whether a thread steps the core now
        self.drivers = 0  # threads in `run_forever`
        self.closed = False

    def submit(self, input_ids, on_output: Callable[[RequestOutput], None], **generate_kwargs) -> str:
        """Validate (raising ValueError / TypeError in the caller's thread, before any work) and queue a
        `generate` call; `on_output` gets its outputs, from the thread that steps."""
        return self.submit_state(self.core.prepare(input_ids, **generate_kwargs), on_output)

    def submit_state(self, state: Decoding, on_output: Callable[[RequestOutput], None], waits: bool = False) -> str:
        """waits: the caller will step through `wait`; else, with nobody in `run_forever`, the loop starts a
        thread of its own."""
        with self.wake:
            if self.closed:
                raise RuntimeError("the engine loop is closed")
            request_id = self.core.add(state)
            self.callbacks[request_id] = on_output
            if not waits and self.drivers == 0:
                self.drivers += 1  # counted now: a second submit must not start another
                threading.Thread(target=self._serve, name="specbeam-engine", daemon=True).start()
            self.wake.notify_all()
        return request_id

    def wait(self, done: threading.Event) -> None:
        """Step the core on this thread whenever nobody else does, until `done` is set (by the callback of the
        caller's request)."""
        while self._take_turn(finished=done.is_set, idle=lambda: False):
            try:
                while not done.is_set():
                    self._step()
            except BaseException as error:  # an interrupt (KeyboardInterrupt) mid-step: that step may be half done
                for output in self.core.fail_all(error):
                    self._deliver(output)
                raise
            finally:
                self._end_turn()

    def run_forever(self, started: Callable[[], None] = lambda: None) -> None:
        """Step the core on this thread whenever it has work, until `close`; `started` runs once this thread
        counts as the one that steps (a server starts taking requests there)."""
        with self.wake:
            self.drivers += 1
        started()
        self._serve()

    def abort(self, request_id: str) -> None:
        """Stop a request: its blocks are free after the next step, and its callback hears it ended."""
        self.core.abort(request_id)
        with self.wake:
            self.wake.notify_all()

    def close(self) -> None:
        """Abort what runs; `run_forever` returns once the aborts are delivered."""
        with self.wake:
            self.closed = True
            for request_id in list(self.callbacks):
                self.core.abort(request_id)
            self.wake.notify_all()

    def _serve(self) -> None:
        """`run_forever`'s loop (this thread already counted in `drivers`)."""
        work = self.core.has_unfinished_requests
        try:
            while self._take_turn(finished=lambda: self.closed and not work(), idle=lambda: not work()):
                try:
                    while work():
                        self._step()
                finally:
                    self._end_turn()
        finally:
            with self.wake:
                self.drivers -= 1

    def _take_turn(self, finished: Callable[[], bool], idle: Callable[[], bool]) -> bool:
        """Wait until this thread may step (nobody else does and there is work); False once `finished`."""
        with self.wake:
            while not finished() and (self.stepping or idle()):
                self.wake.wait()
            if finished():
                return False
            self.stepping = True
        ops.serial_torch_ops(True)  # (off the main thread)
        return True

    def _end_turn(self) -> None:
        ops.serial_torch_ops(False)  # the caller's thread gets its torch operations back as they were
        with self.wake:
            self.stepping = False
            self.wake.notify_all()

    def _step(self) -> None:
        """One step of the core; a step that breaks fails the requests it held, and the loop goes on."""
        try:
            outputs = self.core.step()
        except Exception as error:  # noqa: BLE001
            log.exception("specbeam: an engine step failed; failing the requests it held")
            outputs = self.core.fail_all(error)
        for output in outputs:
            self._deliver(output)
        if any(output.finished for output in outputs):
            with self.wake:  # the callers waiting for them
                self.wake.notify_all()

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
