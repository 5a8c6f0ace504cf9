"""The server's queue in front of the engine: requests run while their sequences fit in --max-num-seqs, the
rest wait in arrival order, and past --max-queue waiting a request is turned away (503)."""
import asyncio
from collections import deque


class QueueFull(Exception):
    pass


class Admission:
    """Lives on the event loop's thread; `rows` are the sequences a request decodes (beams or samples)."""

    def __init__(self, max_rows: int, max_queue: int):
        self.max_rows, self.max_queue = max_rows, max_queue
        self.used = 0
        self.waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    async def acquire(self, rows: int) -> None:
        if not self.waiters and self._fits(rows):
            self.used += rows
            return
        if len(self.waiters) >= self.max_queue:
            raise QueueFull(f"{len(self.waiters)} requests are waiting already (--max-queue {self.max_queue})")
        entry = (rows, asyncio.get_running_loop().create_future())
        self.waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].cancelled():  # still waiting: leave the line
                self.waiters.remove(entry)
                self._admit()
            else:  # admitted as it was cancelled
                self.release(rows)
            raise

    def release(self, rows: int) -> None:
        self.used -= rows
        self._admit()

    def _admit(self) -> None:
        while self.waiters and self._fits(self.waiters[0][0]):
            rows, future = self.waiters.popleft()
            self.used += rows
            future.set_result(None)

    def _fits(self, rows: int) -> bool:
        return self.used == 0 or self.used + rows <= self.max_rows
