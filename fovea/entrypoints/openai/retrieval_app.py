"""`fovea serve` for a stage-1 export (`Blip2ForImageTextRetrieval`): embeddings and scores, no generation.

    POST /v1/embeddings    texts and image_url parts -> normalised ITC embeddings (embeddings.py)
    POST /score, /v1/score vLLM's score API: images (`text_1`) against texts (`text_2`), method "itc" | "itm"
    GET  /v1/models, /health

Such a checkpoint has no language model, so the generation engine (KV cache, scheduler) is not built; the model
(`fovea.engine.retrieval.RetrievalRunner`) runs one call at a time on its own thread, each call batched. The
API key, the served names and the media rules are the generation server's (`ServerSettings`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from typing import Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import Response
from pydantic import Field

from fovea.config import EngineConfig
from fovea.engine.retrieval import RetrievalRunner
from fovea.entrypoints.openai import protocol as p
from fovea.entrypoints.openai.embeddings import EmbeddingRequest, EmbeddingResponse, EmbeddingServing
from fovea.entrypoints.openai.errors import api_key_check, install_error_handlers, model_check
from fovea.entrypoints.openai.messages import ImageURLPart
from fovea.entrypoints.openai.openapi import error_responses


class ScoreRequest(p.OpenAIRequestModel):
    """vLLM's score request: one item of `text_1` against many of `text_2`, many against one, or pair by pair."""

    model: str | None = None
    text_1: ImageURLPart | list[ImageURLPart] = Field(description="the image(s), as image_url parts")
    text_2: str | list[str] = Field(description="the text(s)")
    method: str = Field("itc", description="fovea: itc (cosine of the best query) or itm (P(match))")
    user: str | None = None


class ScoreData(p.OpenAIModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(p.OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: p.UsageInfo


def build_retrieval_app(runner: RetrievalRunner, settings, model_path: str) -> FastAPI:
    """`settings`: the generation server's `ServerSettings`; LoRA modules and chat templates do not apply."""
    if settings.lora_modules:
        raise ValueError("a Blip2ForImageTextRetrieval checkpoint has no language model for LoRA adapters")
    model_names = settings.served_model_names or [model_path]
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fovea-retrieval")

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    embedding = EmbeddingServing(lambda items, pooling: run(runner.embed, items, pooling), settings.fetcher)
    app = FastAPI(title="fovea (retrieval)")
    install_error_handlers(app)

    check_api_key = api_key_check(settings.api_key)
    check_model = model_check(model_names)

    @app.get("/health", response_class=Response)
    async def health() -> Response:
        return Response(status_code=200)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)], responses=error_responses(401))
    scores = APIRouter(dependencies=[Depends(check_api_key)], responses=error_responses(401))

    @v1.get("/models")
    async def list_models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=name, root=model_path, max_model_len=runner.max_text_tokens)
                                 for name in model_names])

    @v1.post("/embeddings", responses=error_responses(400, 404, 413))
    async def embeddings(body: EmbeddingRequest) -> EmbeddingResponse:
        return await embedding.create(body, check_model(body.model))

    async def score(body: ScoreRequest) -> ScoreResponse:
        name = check_model(body.model)
        parts = body.text_1 if isinstance(body.text_1, list) else [body.text_1]
        texts = body.text_2 if isinstance(body.text_2, list) else [body.text_2]
        if not parts or not texts:
            raise p.RequestError("text_1 and text_2 must not be empty", param="text_1" if not parts else "text_2")
        if len(parts) != 1 and len(texts) != 1 and len(parts) != len(texts):
            raise p.RequestError(f"{len(parts)} images and {len(texts)} texts; give one of either, or as many of "
                                 f"each", param="text_2")
        images = await embedding.fetch_images(parts)
        images = images * len(texts) if len(images) == 1 else images
        texts = texts * len(images) if len(texts) == 1 else texts
        values = await run(runner.score, images, texts, body.method)
        num_tokens = sum(len(runner.tokenizer(t).input_ids) for t in texts)
        return ScoreResponse(id=f"score-{uuid.uuid4().hex}", created=int(time.time()), model=name,
                             data=[ScoreData(index=i, score=s) for i, s in enumerate(values)],
                             usage=p.make_usage(num_tokens, 0))

    for router, path in ((scores, "/score"), (v1, "/score")):
        router.post(path, responses=error_responses(400, 404, 413))(score)
    app.include_router(v1)
    app.include_router(scores)
    return app


def run_retrieval_server(engine_config: EngineConfig, settings, *, host: str = "127.0.0.1", port: int = 8000,
                         log_level: str = "info") -> None:
    runner = RetrievalRunner.from_config(engine_config)
    app = build_retrieval_app(runner, settings, engine_config.model)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
