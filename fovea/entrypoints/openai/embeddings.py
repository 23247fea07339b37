"""POST /v1/embeddings: vLLM's embeddings API over `LLM.embed` (`fovea.engine.pooling`), images included.

Request (vLLM's two shapes, plus fovea's `pooling`):
    {"input": [{"type": "image_url", "image_url": {"url": ...}}, ...]}   one embedding per image part
    {"messages": [{"role": "user", "content": [{"type": "image_url", ...}]}]}   one embedding (one image)
    "pooling": "projected" (default) | "qformer" | "vision"; "encoding_format": "float" (default) | "base64"
Strings in `input` (text) are refused with a 400 by a model that embeds images only, as is any unknown pooling.

Response: OpenAI's list of {"object": "embedding", "index", "embedding"}. A BLIP-2 embedding is a matrix (one
row per query or patch), so "float" gives nested lists (rows x dim, vLLM's token_embed shape) and "base64" the
row-major float32 bytes of the whole matrix (what OpenAI's client decodes to one flat list).
"""
from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Literal

import numpy as np
from pydantic import Field

from fovea.engine.async_engine import AsyncLLMEngine
from fovea.entrypoints.media_errors import find_refusal
from fovea.entrypoints.media_fetch import MediaFetcher
from fovea.entrypoints.media_limits import prepare_media_async
from fovea.entrypoints.openai import protocol as p
from fovea.entrypoints.openai.messages import ChatMessageParam, ImageURLPart, UserMessage


class EmbeddingRequest(p.OpenAIRequestModel):
    model: str | None = None
    input: str | list[str | ImageURLPart] | None = Field(
        None, description="image_url parts (one embedding each); text strings are refused by image-only models")
    messages: list[ChatMessageParam] | None = Field(None, description="vLLM's chat form: one user image")
    pooling: str | None = Field(None, description="fovea: projected (default), qformer or vision")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: p.Integer(ge=1) | None = Field(None, description="refused: BLIP-2's widths are fixed")
    user: str | None = None


class EmbeddingData(p.OpenAIModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[list[float]] | str


class EmbeddingResponse(p.OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: p.UsageInfo


def _image_urls(body: EmbeddingRequest) -> list[str]:
    if (body.input is None) == (body.messages is None):
        raise p.RequestError("give exactly one of input (image_url parts) or messages", param="input")
    if body.dimensions is not None:
        raise p.RequestError("dimensions is not supported: the embedding widths are the model's own",
                             param="dimensions")
    if body.messages is not None:
        urls = []
        for i, message in enumerate(body.messages):
            parts = [message.content] if isinstance(message.content, str) else message.content or []
            if not isinstance(message, UserMessage) or any(not isinstance(part, ImageURLPart) for part in parts):
                raise p.RequestError(f"messages[{i}]: this model embeds images only; give user messages holding "
                                     f"image_url parts and no text", param="messages")
            urls.extend(part.image_url.url for part in parts)
        if len(urls) != 1:
            raise p.RequestError(f"messages hold {len(urls)} images; a chat embedding takes exactly one "
                                 f"(use input for several)", param="messages")
        return urls
    items = [body.input] if isinstance(body.input, str) else body.input
    if not items:
        raise p.RequestError("input is empty", param="input")
    for i, item in enumerate(items):
        if isinstance(item, str):
            raise p.RequestError(f"input[{i}] is text: BLIP-2 embeddings need an image; give "
                                 f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}} parts", param="input")
    return [item.image_url.url for item in items]


class EmbeddingServing:
    def __init__(self, engine: AsyncLLMEngine, fetcher: MediaFetcher):
        self.engine, self.fetcher = engine, fetcher
        self.decode_slots = asyncio.Semaphore(fetcher.config.max_concurrent_media_decodes)

    async def create(self, body: EmbeddingRequest, model: str) -> EmbeddingResponse:
        urls = _image_urls(body)
        try:
            encoded = await asyncio.to_thread(lambda: [self.fetcher(url) for url in urls])
            images = (await prepare_media_async({"image": encoded}, self.fetcher.config, self.decode_slots))["image"]
        except ValueError as err:
            if (refusal := find_refusal(err)) is not None:
                self.fetcher.refusals.add(refusal.reason)
            raise
        embeddings = await self.engine.embed(images, body.pooling)
        data = []
        for index, embedding in enumerate(embeddings):
            if body.encoding_format == "base64":
                value = base64.b64encode(embedding.numpy().astype(np.float32).tobytes()).decode("ascii")
            else:
                value = embedding.tolist()
            data.append(EmbeddingData(index=index, embedding=value))
        # images are the prompt: each counts its rows (query or patch tokens), as vLLM counts prompt tokens
        num_tokens = sum(e.shape[0] for e in embeddings)
        return EmbeddingResponse(id=f"embd-{uuid.uuid4().hex}", created=int(time.time()), model=model, data=data,
                                 usage=p.make_usage(num_tokens, 0))
