"""The FastAPI application: OpenAI's completions, chat completions and models endpoints, `/health` and
`/metrics`. Startup warms the engine up; shutdown aborts what still runs and stops the engine's loop."""
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from specbeam.serve import disconnect, stream
from specbeam.serve.api_format import ApiFormat
from specbeam.serve.chat import Chat
from specbeam.serve.completions import Completions
from specbeam.serve.errors import install_error_handlers
from specbeam.serve.generation import Generation
from specbeam.serve.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from specbeam.serve.server import Server

CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection; nobody reads it


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.warm_up()
        yield
        server.close()

    app = FastAPI(title="specbeam", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app, server.metrics)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await respond(server, Completions(body, server), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await respond(server, Chat(body, server), request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.config.model_name, max_model_len=server.limits.context_length)])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def respond(server: Server, api: ApiFormat, request: Request) -> Response:
    """Checks everything before any work, waits for a place, then streams or answers at the end."""
    server.check_model(api.body.model)
    prompt_ids = api.prompt_ids()
    generation = Generation(server, server.new_id(api.id_prefix), prompt_ids, api.plan(len(prompt_ids)))
    gone = disconnect.watch(request)
    try:
        await generation.start(gone)
    except BaseException as error:
        generation.close()
        gone.cancel()
        if isinstance(error, disconnect.ClientGone):
            return Response(status_code=CLIENT_CLOSED)
        raise
    if api.body.stream:
        return StreamingResponse(stream.events(api, generation, gone), media_type="text/event-stream")
    try:
        async for _ in generation.deltas(gone):
            pass
        return JSONResponse(api.response(generation).model_dump())
    except disconnect.ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        generation.close()
        gone.cancel()
