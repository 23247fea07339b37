"""The OpenAI-compatible HTTP server: a FastAPI app over one `AsyncLLMEngine`, run by uvicorn.

    POST /v1/chat/completions   messages (text, image_url, video_url parts) -> chat template -> engine (chat.py)
    POST /v1/completions        prompt strings or token ids -> engine (completions.py)
    POST /v1/embeddings         image_url parts -> BLIP-2 image embeddings (embeddings.py)
    GET  /v1/models, /health, /metrics

LoRA adapters (`--lora-modules name=path`) are served models of their own: listed by /v1/models with the base
model as `parent`, and chosen per request by `"model": name`; the base model's names run without adapter.

Every request is validated and added to the engine before its response starts, so a refusal is a proper
status code with OpenAI's error body (errors.py). After that the request belongs to its response: whatever way
the response ends (done, client gone, server stopping) aborts it, which frees its KV blocks at once (a no-op if
it had finished).

Shutdown (SIGTERM) is uvicorn's: stop accepting, let open responses finish, then stop the engine loop; with
--shutdown-timeout-s, requests still running then are aborted and answered with an error (see run_server).
"""
from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import transformers
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from fovea.config import EngineConfig
from fovea.engine.async_engine import AsyncLLMEngine
from fovea.engine.llm_engine import LLMEngine
from fovea.entrypoints.chat_templates import resolve_chat_template
from fovea.entrypoints.media_fetch import MediaFetcher
from fovea.entrypoints.openai import protocol as p
from fovea.entrypoints.openai.chat import ChatServing
from fovea.entrypoints.openai.completions import CompletionServing
from fovea.entrypoints.openai.embeddings import EmbeddingRequest, EmbeddingResponse, EmbeddingServing
from fovea.entrypoints.openai.errors import APIError, api_key_check, install_error_handlers, model_check
from fovea.entrypoints.openai.metrics import CONTENT_TYPE, ErrorCountingMiddleware, ServerMetrics
from fovea.entrypoints.openai.openapi import error_responses, openapi_schema
from fovea.lora.request import LoRARequest
from fovea.models.interfaces import is_encoder_decoder


@dataclass(slots=True)
class ServerSettings:
    """Everything about serving that is not the engine's."""

    served_model_names: list[str] = field(default_factory=list)  # empty: the model path
    api_key: str | None = None
    max_waiting_requests: int | None = None
    chat_template: str | None = None  # a Jinja string; None: the checkpoint's own, else fovea's fallback
    fetcher: MediaFetcher = field(default_factory=MediaFetcher)
    shutdown_timeout_s: float | None = None  # after SIGTERM: None waits for every running request
    lora_modules: list[LoRARequest] = field(default_factory=list)  # served by their lora_name


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    llm_engine: LLMEngine = engine.engine
    base_names = settings.served_model_names or [llm_engine.config.model]
    loras = {lora.lora_name: lora for lora in settings.lora_modules}
    clash = sorted(set(loras) & set(base_names))
    if clash or len(loras) != len(settings.lora_modules):
        raise ValueError(f"LoRA module names must be unique and differ from the served model names; "
                         f"{clash or 'a LoRA name'} repeats")
    for lora in settings.lora_modules:  # read and checked now: a bad adapter stops the server from starting
        llm_engine.add_lora(lora)
    model_names = base_names + list(loras)
    metrics = ServerMetrics(model_names[0], lambda: engine.stats, settings.fetcher.refusals)
    engine.stat_loggers.append(metrics)
    # the server's own tokenizer: chats are rendered and encoded in request threads, never racing the engine thread
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_engine.config.tokenizer_path)
    chat_template = resolve_chat_template(tokenizer, llm_engine.hf_config.model_type, settings.chat_template,
                                          is_encoder_decoder=is_encoder_decoder(llm_engine.hf_config))
    chat = ChatServing(engine, tokenizer, settings.fetcher, chat_template)
    completion = CompletionServing(engine, tokenizer)
    embedding = EmbeddingServing(engine.embed, settings.fetcher)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await engine.shutdown(timeout_s=settings.shutdown_timeout_s)

    app = FastAPI(title="fovea", lifespan=lifespan)
    app.state.chat_template = chat_template
    app.state.metrics = metrics  # a Ray Serve replica also serves them on its own port (entrypoints/ray/replica.py)
    app.openapi = lambda: openapi_schema(app, model_names, llm_engine.input_processor.vocab_size)
    install_error_handlers(app)
    app.add_middleware(ErrorCountingMiddleware, metrics=metrics, model_name=model_names[0])

    check_api_key = api_key_check(settings.api_key)
    check_model = model_check(model_names)

    @app.get("/health", response_class=Response, responses={
        200: {"description": "the engine is running", "content": None},
        503: {"description": "the engine is not running", "content": None}})
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {CONTENT_TYPE.split(";")[0]: {}}}})
    async def get_metrics() -> Response:
        if engine.is_running:
            await engine.get_stats()  # let queued aborts and adds land before reading the snapshot
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)], responses=error_responses(401))

    @v1.get("/models")
    async def list_models() -> p.ModelList:
        cards = [p.ModelCard(id=name, root=llm_engine.config.model, max_model_len=llm_engine.max_model_len)
                 for name in base_names]
        cards += [p.ModelCard(id=name, root=lora.lora_path, parent=base_names[0],
                              max_model_len=llm_engine.max_model_len) for name, lora in loras.items()]
        return p.ModelList(data=cards)

    generation = error_responses(400, 404, 413, 500, 503)

    @v1.post("/chat/completions", response_model=None, responses={**generation, 200: {
        "model": p.ChatCompletionResponse, "description": "the completion; with stream: server-sent events of "
        "ChatCompletionChunk, ending with 'data: [DONE]'", "content": {"text/event-stream": {}}}})
    async def chat_completions(body: p.ChatCompletionRequest, raw: Request) -> Response:
        name = check_model(body.model)
        return await chat.create(body, name, raw, loras.get(name))

    @v1.post("/completions", response_model=None, responses={**generation, 200: {
        "model": p.CompletionResponse, "description": "the completion; with stream: server-sent events of "
        "CompletionResponse chunks, ending with 'data: [DONE]'", "content": {"text/event-stream": {}}}})
    async def completions(body: p.CompletionRequest, raw: Request) -> Response:
        name = check_model(body.model)
        return await completion.create(body, name, raw, loras.get(name))

    @v1.post("/embeddings", responses=error_responses(400, 404, 413, 500, 503))
    async def embeddings(body: EmbeddingRequest) -> EmbeddingResponse:
        name = check_model(body.model)
        if name in loras:
            raise APIError(400, "embeddings come from the base model; LoRA adapters change only the language model",
                           "invalid_request_error", param="model")
        return await embedding.create(body, name)

    app.include_router(v1)
    return app


def run_server(engine_config: EngineConfig, settings: ServerSettings, *, host: str = "127.0.0.1",
               port: int = 8000, log_level: str = "info") -> None:
    """Load the model (before the port opens, so `/health` answers only when ready) and serve until SIGTERM.
    A stage-1 export (no language model) gets the embeddings-and-scores server instead (retrieval_app.py)."""
    from fovea.engine.retrieval import is_retrieval_checkpoint

    if is_retrieval_checkpoint(engine_config.model):
        from fovea.entrypoints.openai.retrieval_app import run_retrieval_server

        return run_retrieval_server(engine_config, settings, host=host, port=port, log_level=log_level)
    engine = AsyncLLMEngine(LLMEngine(engine_config), max_waiting_requests=settings.max_waiting_requests)
    app = build_app(engine, settings)
    print(app.state.chat_template.describe(), file=sys.stderr, flush=True)  # next to the CPU kernels' line
    # After SIGTERM uvicorn stops accepting and waits for open responses. With a timeout, the engine aborts what
    # still runs at `shutdown_timeout_s`, so each response ends with an error event or a 503 in OpenAI's shape;
    # uvicorn's own cut-off (cancelling responses mid-write) comes only a grace period later, as a last resort.
    timeout_s = settings.shutdown_timeout_s
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=None if timeout_s is None else timeout_s + _FLUSH_GRACE_S)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if timeout_s is not None and not self.should_exit:
                engine.stop_soon(timeout_s)
            super().handle_exit(sig, frame)

    server = Server(config)
    # a dead worker process (tensor/pipeline parallelism): requests get 503s, then the server stops and exits 1
    engine.dead_callbacks.append(lambda err: setattr(server, "should_exit", True))
    server.run()
    if engine.dead_error is not None:
        raise SystemExit(f"fovea serve: the engine died: {engine.dead_error}")


_FLUSH_GRACE_S = 5.0  # after the engine's aborts at --shutdown-timeout-s: time for the error replies to go out
