"""From the engine's thread to the event loop: a submitted request's outputs, one asyncio queue each."""
import asyncio

import torch

from specbeam.serve.engine_api import Engine, RequestOutput
from specbeam.serve.errors import engine_error


class Handle:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.request_id: str | None = None

    def deliver(self, output: RequestOutput) -> None:
        """Called on the engine's thread."""
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)
        except RuntimeError:  # the event loop is closed: nobody waits for this request any more
            pass

    async def next(self) -> RequestOutput:
        return await self.outputs.get()


def submit(engine: Engine, prompt_ids: list[int], kwargs: dict) -> Handle:
    """Hands one prompt to the engine's loop; its refusal becomes a 400 naming the field."""
    handle = Handle(asyncio.get_running_loop())
    input_ids = torch.tensor([prompt_ids])  # [1, L]
    try:
        handle.request_id = engine.loop.submit(input_ids, handle.deliver, **kwargs)
    except (ValueError, TypeError) as error:
        raise engine_error(error, state="invalid") from error
    return handle
