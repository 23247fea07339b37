"""The OpenAI-compatible HTTP server: a FastAPI app over one `AsyncLLMEngine`, run by uvicorn.

    POST /v1/chat/completions   messages (text, image_url, video_url parts) -> chat template -> engine
    POST /v1/completions        prompt strings or token ids -> engine
    GET  /v1/models, /health, /metrics

Every request is validated and added to the engine before its response starts, so a refusal is a proper
status code (400 invalid, 401 key, 404 model, 413 media too large, 503 queue full) with OpenAI's error body.
After that the request belongs to its response: whatever way the response ends (done, client gone,
server stopping) aborts it, which frees its KV blocks at once (a no-op if it had finished).

Shutdown (SIGTERM) is uvicorn's: stop accepting, let open responses finish, then stop the engine loop.
"""
from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import transformers
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fovea.config import EngineConfig
from fovea.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    RequestAbortedError,
    RequestStream,
)
from fovea.engine.llm_engine import LLMEngine
from fovea.entrypoints.chat_utils import parse_chat_messages, render_chat
from fovea.entrypoints.media_fetch import MediaFetcher, MediaTooLargeError
from fovea.entrypoints.openai import protocol as p
from fovea.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from fovea.outputs import CompletionOutput, RequestOutput
from fovea.sampling_params import SamplingParams


@dataclass(slots=True)
class ServerSettings:
    """Everything about serving that is not the engine's."""

    served_model_names: list[str] = field(default_factory=list)  # empty: the model path
    api_key: str | None = None
    max_waiting_requests: int | None = None
    chat_template: str | None = None  # a Jinja string; None: the checkpoint's own
    fetcher: MediaFetcher = field(default_factory=MediaFetcher)
    shutdown_timeout_s: float | None = None  # after SIGTERM: None waits for every running request


class APIError(Exception):
    def __init__(self, status_code: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type_, param, code


def _error_response(status_code: int, message: str, type_: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status_code)


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    llm_engine: LLMEngine = engine.engine
    model_names = settings.served_model_names or [llm_engine.config.model]
    metrics = ServerMetrics(model_names[0], lambda: engine.stats)
    engine.stat_loggers.append(metrics)
    # the server's own tokenizer: it renders and encodes chats on the event loop, never racing the engine thread
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_engine.config.tokenizer_path)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await engine.shutdown(timeout_s=settings.shutdown_timeout_s)

    app = FastAPI(title="fovea", lifespan=lifespan)
    _install_error_handlers(app)

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", code="invalid_api_key")

    def check_model(name: str | None) -> str:
        if name is None:
            return model_names[0]
        if name not in model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {', '.join(model_names)}",
                           "invalid_request_error", param="model", code="model_not_found")
        return name

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        if engine.is_running:
            await engine.get_stats()  # let queued aborts and adds land before reading the snapshot
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def list_models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=name, root=llm_engine.config.model,
                                             max_model_len=llm_engine.max_model_len) for name in model_names])

    @v1.post("/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, raw: Request) -> Response:
        model = check_model(body.model)
        params = body.to_sampling_params()
        conversation, mm_data = await asyncio.to_thread(_parse_chat, body.messages, llm_engine.mm_limits,
                                                        settings.fetcher)
        text = render_chat(tokenizer, conversation, settings.chat_template, body.add_generation_prompt,
                           chat_template_kwargs=body.chat_template_kwargs)
        prompt: dict[str, Any] = {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        if mm_data:
            prompt["multi_modal_data"] = mm_data
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await engine.add_request(request_id, prompt, params)
        created = int(time.time())
        on_close = lambda: engine.abort(request_id)  # noqa: E731
        if body.stream:
            return _SSEResponse(chat_chunks(body, params, request_id, created, model, stream), on_close)
        final = await _unless_disconnected(raw, _last_output(stream), on_close)
        return JSONResponse(p.chat_response(body, request_id, created, model, final).model_dump())

    @v1.post("/completions")
    async def completions(body: p.CompletionRequest, raw: Request) -> Response:
        model = check_model(body.model)
        params = body.to_sampling_params()
        prompts = body.prompts()
        base_id = f"cmpl-{uuid.uuid4().hex}"
        ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
        streams: list[RequestStream] = []
        on_close = lambda: engine.abort(ids)  # noqa: E731
        try:
            for request_id, prompt in zip(ids, prompts):
                streams.append(await engine.add_request(request_id, prompt, params))
        except BaseException:
            on_close()
            raise
        created = int(time.time())
        if body.stream:
            return _SSEResponse(completion_chunks(body, params, base_id, created, model, streams), on_close)
        finals = await _unless_disconnected(raw, _last_outputs(streams), on_close)
        return JSONResponse(p.completion_response(body, base_id, created, model, finals).model_dump())

    app.include_router(v1)
    return app


def _parse_chat(messages, mm_limits, fetcher: MediaFetcher):
    """chat_utils parses and fetches http(s); then every string item (a data URL, or a local path that
    chat_utils let through because the server allows some) becomes bytes under the server's limits."""
    conversation, mm_data = parse_chat_messages(
        messages, allowed_modalities=mm_limits, fetch=fetcher,
        allow_local_paths=fetcher.allowed_local_media_path is not None)
    resolved = {modality: [fetcher.resolve_item(item) if isinstance(item, str) else item for item in items]
                for modality, items in mm_data.items()}
    return conversation, resolved


# ---- responses -------------------------------------------------------------------------------------------------


class _SSEResponse(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends (also if it never starts)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()


# ---- streaming ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cursor:
    """How much of one choice has been sent."""

    num_chars: int = 0
    num_tokens: int = 0
    is_finished: bool = False


def _holdback(params: SamplingParams) -> int:
    """Characters kept back while generating: a stop string that may still complete is cut from the final
    text, so they must not have been sent (the detokenizer's `visible_text` rule)."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(map(len, params.stop)) - 1


def _advance(cursor: _Cursor, c: CompletionOutput, holdback: int, wants_tokens: bool) -> tuple[str, int] | None:
    """(new text, index of the first new token) to send for this choice, or None if nothing is worth a chunk."""
    if cursor.is_finished:
        return None
    is_done = c.finish_reason is not None
    end = len(c.text) if is_done else max(cursor.num_chars, len(c.text) - holdback)
    text, start = c.text[cursor.num_chars:end], cursor.num_tokens
    if not text and not is_done and not (wants_tokens and len(c.token_ids) > start):
        return None
    cursor.num_chars, cursor.num_tokens, cursor.is_finished = max(end, cursor.num_chars), len(c.token_ids), is_done
    return text, start


def _sse(message: p.OpenAIModel) -> str:
    return f"data: {message.model_dump_json()}\n\n"


def _sse_error(err: BaseException) -> str:
    return _sse(p.ErrorResponse(error=p.ErrorInfo(message=str(err), type="server_error")))


async def chat_chunks(body: p.ChatCompletionRequest, params: SamplingParams, request_id: str, created: int,
                      model: str, stream: RequestStream) -> AsyncIterator[str]:
    def chunk(choices, usage=None) -> str:
        return _sse(p.ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    yield chunk([p.ChatCompletionStreamChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))
                 for i in range(params.n)])
    holdback, cursors, final = _holdback(params), [_Cursor() for _ in range(params.n)], None
    try:
        async for final in stream:
            choices = []
            for c in final.outputs:
                if (step := _advance(cursors[c.index], c, holdback, body.logprobs)) is None:
                    continue
                text, start = step
                logprobs = None
                if body.logprobs:
                    logprobs = p.chat_logprobs(c.token_ids[start:], c.logprobs[start:len(c.token_ids)],
                                               body.top_logprobs or 0)
                choices.append(p.ChatCompletionStreamChoice(
                    index=c.index, delta=p.DeltaMessage(content=text), logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            if choices:
                yield chunk(choices)
    except (RequestAbortedError, EngineDeadError) as err:
        yield _sse_error(err)
    else:
        if body.include_usage:
            num_completion = sum(len(c.token_ids) for c in final.outputs)
            yield chunk([], p.make_usage(len(final.prompt_token_ids), num_completion))
    yield "data: [DONE]\n\n"


async def completion_chunks(body: p.CompletionRequest, params: SamplingParams, request_id: str, created: int,
                            model: str, streams: list[RequestStream]) -> AsyncIterator[str]:
    def chunk(choices, usage=None) -> str:
        return _sse(p.CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage))

    holdback = _holdback(params)
    cursors = [[_Cursor() for _ in range(params.n)] for _ in streams]
    num_prompt = [0] * len(streams)
    num_completion = [0] * len(streams)
    wants_tokens = body.logprobs is not None
    try:
        async for prompt_index, output in iterate_all(streams):
            choices = []
            for c in output.outputs:
                cursor = cursors[prompt_index][c.index]
                offset = cursor.num_chars
                if (step := _advance(cursor, c, holdback, wants_tokens)) is None:
                    continue
                text, start = step
                logprobs = None
                if wants_tokens:
                    logprobs = p.completion_logprobs(c.token_ids[start:], c.logprobs[start:len(c.token_ids)],
                                                     body.logprobs, offset)
                choices.append(p.CompletionChoice(index=prompt_index * params.n + c.index, text=text,
                                                  logprobs=logprobs, finish_reason=c.finish_reason,
                                                  stop_reason=c.stop_reason))
            num_prompt[prompt_index] = len(output.prompt_token_ids)
            num_completion[prompt_index] = sum(len(c.token_ids) for c in output.outputs)
            if choices:
                yield chunk(choices)
    except (RequestAbortedError, EngineDeadError) as err:
        yield _sse_error(err)
    else:
        if body.include_usage:
            yield chunk([], p.make_usage(sum(num_prompt), sum(num_completion)))
    yield "data: [DONE]\n\n"


async def iterate_all(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index of the stream, output) from several streams as outputs arrive, until all are done."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, done))
        except Exception as err:  # handed to the reader, which raises it
            queue.put_nowait((index, err))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_running = len(streams)
        while num_running:
            index, item = await queue.get()
            if item is done:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _unless_disconnected(raw: Request, work: Awaitable, on_close: Callable[[], None]):
    """Await `work`, abandoning it if the client disconnects first; `on_close` runs in every case."""
    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    work_task, watch_task = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise APIError(499, "the client closed the connection", "client_closed_request")
    finally:
        work_task.cancel()
        watch_task.cancel()
        on_close()


async def _last_output(stream: RequestStream) -> RequestOutput:
    output = None
    async for output in stream:
        pass
    return output


async def _last_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for index, output in iterate_all(streams):
        finals[index] = output
    return finals


# ---- errors ----------------------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return _error_response(err.status_code, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # a union (prompt: str | list[...]) reports each branch; the field is the first name in the path
        param = next((x for x in loc if not x.isdigit() and "[" not in x), None) if loc else None
        if first.get("type") == "json_invalid":
            return _error_response(400, f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error")
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
        if first.get("input") is not None and first.get("type") != "missing":
            message += f" (got {first.get('input')!r:.80})"
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(p.RequestError)
    async def request_error(_: Request, err: p.RequestError) -> JSONResponse:
        return _error_response(400, str(err), "invalid_request_error", err.param)

    @app.exception_handler(MediaTooLargeError)
    async def media_too_large(_: Request, err: MediaTooLargeError) -> JSONResponse:
        return _error_response(413, str(err), "invalid_request_error", "messages", "media_too_large")

    @app.exception_handler(ValueError)
    async def value_error(_: Request, err: ValueError) -> JSONResponse:
        if isinstance(err.__cause__, MediaTooLargeError) or isinstance(err.__context__, MediaTooLargeError):
            return await media_too_large(_, err)  # chat_utils wraps it with the message and part
        return _error_response(400, str(err), "invalid_request_error")

    @app.exception_handler(EngineOverloadedError)
    async def overloaded(_: Request, err: EngineOverloadedError) -> JSONResponse:
        return _error_response(503, str(err), "server_error", code="overloaded")

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, err: EngineDeadError) -> JSONResponse:
        return _error_response(500, str(err), "server_error", code="engine_dead")

    @app.exception_handler(RequestAbortedError)
    async def aborted(_: Request, err: RequestAbortedError) -> JSONResponse:  # the server is stopping
        return _error_response(503, str(err), "server_error", code="aborted")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(err.status_code, str(err.detail), "invalid_request_error")


# ---- running -----------------------------------------------------------------------------------------------


def run_server(engine_config: EngineConfig, settings: ServerSettings, *, host: str = "127.0.0.1",
               port: int = 8000, log_level: str = "info") -> None:
    """Load the model (before the port opens, so `/health` answers only when ready) and serve until SIGTERM."""
    engine = AsyncLLMEngine(LLMEngine(engine_config), max_waiting_requests=settings.max_waiting_requests)
    app = build_app(engine, settings)
    # after SIGTERM uvicorn waits for open responses; past the timeout it cancels them (which aborts their requests)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    uvicorn.Server(config).run()
