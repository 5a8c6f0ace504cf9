"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for everything the server
refuses or fails at; FastAPI's own errors (schema, unknown route) are answered in the same shape."""
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from specbeam.serve.metrics import ServerMetrics
from specbeam.serve.params import ParamError
from specbeam.serve.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("specbeam.serve")

# generate() arguments, as the engine's errors name them -> the request field they come from
FIELD_OF_ARGUMENT = {
    "input_ids": "prompt", "attention_mask": "prompt", "max_new_tokens": "max_tokens", "max_length": "max_tokens",
    "num_return_sequences": "n", "num_beams": "best_of", "temperature": "temperature", "top_p": "top_p",
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "length_penalty": "length_penalty", "early_stopping": "early_stopping", "stop_strings": "stop",
    "generator": "seed",
}


class ApiError(Exception):
    """state: how `/metrics` counts the request ("invalid", "rejected", ...); None when already counted."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 state: str | None = "invalid", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.state, self.headers = status, param, code, state, headers

    def body(self) -> ErrorResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return ErrorResponse(error=ErrorDetail(message=str(self), type=kind, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def engine_error(error: Exception, state: str | None) -> ApiError:
    """The engine's refusal (ValueError / TypeError naming a generate argument): a 400 naming the request
    field it came from; anything else is the server's fault."""
    if not isinstance(error, (ValueError, TypeError)):
        return ApiError(500, f"the engine failed: {type(error).__name__}: {error}", state=state)
    named = [(m.start(), field) for name, field in FIELD_OF_ARGUMENT.items()
             if (m := re.search(rf"\b{name}\b", str(error)))]
    return ApiError(400, str(error), param=min(named)[1] if named else None, state=state)


def validation_error(error: RequestValidationError) -> ApiError:
    """The most specific schema error (the deepest), naming its top-level field."""
    first = max(error.errors(), key=lambda e: len(e["loc"]))
    if first["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}", code="json_invalid")
    loc = [part for part in first["loc"][1:] if not _union_member(part)]
    param = loc[0] if loc and isinstance(loc[0], str) else None
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return ApiError(400, f"{where or 'the request body'}: {first['msg']}", param=param, code=first["type"])


def _union_member(part) -> bool:
    """pydantic puts the member of a union it tried in the error's location: 'str', 'list[int]', ..."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part)


def install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        if error.state is not None:
            metrics.count(error.state)
        return error.response()

    async def param_error(request: Request, error: ParamError) -> JSONResponse:
        return await api_error(request, ApiError(400, str(error), param=error.param))

    async def schema_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(error))

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail), state=None, headers=error.headers).response()

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return await api_error(request, ApiError(500, f"{type(error).__name__}: {error}", state="failed"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ParamError, param_error)
    app.add_exception_handler(RequestValidationError, schema_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
