"""Noticing that a client went away, whatever the request is waiting for at the time."""
import asyncio
from typing import Awaitable

from fastapi import Request


class ClientGone(Exception):
    """The client closed its connection: the request's work is to stop."""


def watch(request: Request) -> asyncio.Task:
    """A task that ends when the client disconnects (the request's body has been read already)."""

    async def until_disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(until_disconnected())


async def race(awaitable: Awaitable, gone: asyncio.Task):
    """The awaitable's result, or ClientGone (the awaitable cancelled) if the client leaves first."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone
