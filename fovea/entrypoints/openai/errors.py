"""Every refusal as OpenAI's error body with the status code a client expects.

    400 invalid request (validation, bad media, a template that fails, a grammar over its limits)   401 API key   404 model
    413 media too large   499 client gone   500 engine dead, or the model raised on this request (the others
    go on)   503 queue full, the server is stopping, or a worker process of the engine died (the server then exits)
"""
from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fovea.engine.async_engine import (
    ConstraintLimitError,
    EngineDeadError,
    EngineOverloadedError,
    EngineUnavailableError,
    RequestAbortedError,
    RequestFailedError,
)
from fovea.entrypoints.media_fetch import MediaTooLargeError
from fovea.entrypoints.openai import protocol as p


class APIError(Exception):
    def __init__(self, status_code: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type_, param, code


def api_key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: a 401 unless the request carries `Authorization: Bearer <api_key>` (always passes
    when no key is configured). Compared in constant time."""
    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", code="invalid_api_key")
    return check_api_key


def model_check(model_names: Sequence[str]) -> Callable[[str | None], str]:
    """The served name a request's `model` picks: the first when it names none, a 404 listing them when it names
    one this server does not serve."""
    def check_model(name: str | None) -> str:
        if name is None:
            return model_names[0]
        if name not in model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {', '.join(model_names)}",
                           "invalid_request_error", param="model", code="model_not_found")
        return name
    return check_model


def error_response(status_code: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status_code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err.status_code, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            first = next(e for e in errors if e.get("type") == "json_invalid")
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error")
        # a union (content: str | list[part]) reports each branch: the deepest error is the one that says most,
        # and branches failing at the same depth are all named (prompt.0: a str; or an int; or a list)
        depth = max(len(e.get("loc", ())) for e in errors)
        first = next(e for e in errors if len(e.get("loc", ())) == depth)
        loc = _field_path(first.get("loc", ()))
        same = [e for e in errors if len(e.get("loc", ())) == depth and _field_path(e.get("loc", ())) == loc]
        param = loc[0] if loc else None
        message = f"{'.'.join(loc) or 'body'}: {'; or '.join(dict.fromkeys(e.get('msg') for e in same))}"
        if first.get("input") is not None and first.get("type") != "missing":
            message += f" (got {first.get('input')!r:.80})"
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(p.RequestError)
    async def request_error(_: Request, err: p.RequestError) -> JSONResponse:
        return error_response(400, str(err), "invalid_request_error", err.param)

    @app.exception_handler(MediaTooLargeError)
    async def media_too_large(_: Request, err: MediaTooLargeError) -> JSONResponse:
        return error_response(413, str(err), "invalid_request_error", "messages", "media_too_large")

    @app.exception_handler(ValueError)
    async def value_error(_: Request, err: ValueError) -> JSONResponse:
        if isinstance(err.__cause__, MediaTooLargeError) or isinstance(err.__context__, MediaTooLargeError):
            return await media_too_large(_, err)  # chat_utils wraps it with the message and part
        return error_response(400, str(err), "invalid_request_error")

    @app.exception_handler(EngineOverloadedError)
    async def overloaded(_: Request, err: EngineOverloadedError) -> JSONResponse:
        return error_response(503, str(err), "server_error", code="overloaded")

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, err: EngineDeadError) -> JSONResponse:
        return error_response(500, str(err), "server_error", code="engine_dead")

    @app.exception_handler(EngineUnavailableError)
    async def engine_unavailable(_: Request, err: EngineUnavailableError) -> JSONResponse:  # a worker died
        return error_response(503, str(err), "server_error", code="engine_unavailable")

    @app.exception_handler(RequestFailedError)
    async def request_failed(_: Request, err: RequestFailedError) -> JSONResponse:
        if isinstance(err, ConstraintLimitError):  # the client's grammar, not the model
            return error_response(400, str(err), "invalid_request_error", "structured_outputs")
        return error_response(500, str(err), "server_error", code="model_error")

    @app.exception_handler(RequestAbortedError)
    async def aborted(_: Request, err: RequestAbortedError) -> JSONResponse:  # the server is stopping
        return error_response(503, str(err), "server_error", code="aborted")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        response = error_response(err.status_code, str(err.detail), "invalid_request_error")
        response.headers.update(err.headers or {})  # a 405's Allow (RFC 9110)
        return response


def _field_path(loc: tuple) -> list[str]:
    """pydantic's error location as the request's own path: messages.0.content.1.image_url.url.

    Unions put a label in the path for the branch that failed: the type ('str', 'constrained-str', 'list[...]')
    and, for a union chosen by a field, the tag ('user', 'image_url') right after the list index. Neither is a
    field the client wrote, so both are left out; so is FastAPI's leading 'body'.
    """
    path: list[str] = []
    previous: object = None
    for item in loc:
        is_tag = isinstance(previous, int) and item in _UNION_TAGS
        is_label = isinstance(item, str) and ("[" in item or "-" in item or item in _TYPE_LABELS)
        if item != "body" and not is_tag and not is_label:
            path.append(str(item))
        previous = item
    return path


_UNION_TAGS = frozenset({"system", "developer", "user", "assistant", "tool", "text", "image_url", "video_url"})
_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "none"})
