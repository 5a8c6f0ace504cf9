"""Server-sent events: `data: {chunk}` lines, then `data: [DONE]`. An error after the stream has started is
sent as one `data: {"error": ...}` event."""
from collections.abc import AsyncIterator

from pydantic import BaseModel

from specbeam.serve.api_format import ApiFormat
from specbeam.serve.disconnect import ClientGone
from specbeam.serve.errors import ApiError
from specbeam.serve.generation import Generation

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def events(api: ApiFormat, generation: Generation, gone) -> AsyncIterator[str]:
    """The stream of one request; however it ends, the request is closed (its engine work aborted if it still
    runs) and the disconnect watch stopped."""
    try:
        for chunk in api.opening(generation):
            yield sse(chunk)
        async for deltas in generation.deltas(gone):
            for chunk in api.chunks(generation, deltas):
                yield sse(chunk)
        if api.body.include_usage:
            yield sse(api.usage_chunk(generation))
        yield DONE
    except ClientGone:
        pass
    except ApiError as error:
        yield sse(error.body())
        yield DONE
    finally:
        generation.close()
        gone.cancel()
