"""POST /v1/embeddings: vLLM's embeddings API over `LLM.embed`, images included.

Request (vLLM's two shapes, plus fovea's `pooling`):
    {"input": ["a text", {"type": "image_url", "image_url": {"url": ...}}, ...]}   one embedding per item
    {"messages": [{"role": "user", "content": [{"type": "image_url", ...}]}]}       one embedding (one image)
    "pooling": the model's stages (`fovea.engine.pooling`, `fovea.engine.retrieval`); "encoding_format":
    "float" (default) | "base64"
Texts reach the model, which refuses them with a 400 if it embeds images only (BLIP-2), as any unknown pooling.

Response: OpenAI's list of {"object": "embedding", "index", "embedding"}. An embedding is a matrix (one row per
query, patch or text), so "float" gives nested lists (rows x dim, vLLM's token_embed shape) and "base64" the
row-major float32 bytes of the whole matrix (what OpenAI's client decodes to one flat list).
"""
from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fovea.entrypoints.media_errors import find_refusal
from fovea.entrypoints.media_fetch import MediaFetcher
from fovea.entrypoints.media_limits import prepare_media_async
from fovea.entrypoints.openai import protocol as p
from fovea.entrypoints.openai.messages import ChatMessageParam, ImageURLPart, UserMessage


class EmbeddingRequest(p.OpenAIRequestModel):
    model: str | None = None
    input: str | list[str | ImageURLPart] | None = Field(
        None, description="texts and image_url parts, one embedding each (BLIP-2 refuses text; stage-1 takes both)")
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


def _items(body: EmbeddingRequest) -> list[str | ImageURLPart]:
    """The inputs in order: texts as strings (the model decides whether it embeds text), images as their parts."""
    if (body.input is None) == (body.messages is None):
        raise p.RequestError("give exactly one of input (texts or image_url parts) or messages", param="input")
    if body.dimensions is not None:
        raise p.RequestError("dimensions is not supported: the embedding widths are the model's own",
                             param="dimensions")
    if body.messages is not None:
        parts = []
        for i, message in enumerate(body.messages):
            content = [message.content] if isinstance(message.content, str) else message.content or []
            if not isinstance(message, UserMessage) or any(not isinstance(part, ImageURLPart) for part in content):
                raise p.RequestError(f"messages[{i}]: a chat embedding is of one image; give user messages holding "
                                     f"image_url parts and no text (texts go in input)", param="messages")
            parts.extend(content)
        if len(parts) != 1:
            raise p.RequestError(f"messages hold {len(parts)} images; a chat embedding takes exactly one "
                                 f"(use input for several)", param="messages")
        return parts
    items = [body.input] if isinstance(body.input, str) else body.input
    if not items:
        raise p.RequestError("input is empty", param="input")
    return list(items)


class EmbeddingServing:
    """`embed(inputs, pooling)`: the model's, run off the event loop (`AsyncLLMEngine.embed` for BLIP-2, the
    retrieval server's runner for stage-1 exports); inputs are texts and PIL images."""

    def __init__(self, embed: Callable[[list, str | None], Awaitable[list[torch.Tensor]]], fetcher: MediaFetcher):
        self.embed, self.fetcher = embed, fetcher
        self.decode_slots = asyncio.Semaphore(fetcher.config.max_concurrent_media_decodes)

    async def fetch_images(self, parts: list[ImageURLPart]) -> list:
        """PIL images for image_url parts, under the server's fetch rules and decode limits."""
        try:
            encoded = await asyncio.to_thread(lambda: [self.fetcher(part.image_url.url) for part in parts])
            return (await prepare_media_async({"image": encoded}, self.fetcher.config, self.decode_slots))["image"]
        except ValueError as err:
            if (refusal := find_refusal(err)) is not None:
                self.fetcher.refusals.add(refusal.reason)
            raise

    async def create(self, body: EmbeddingRequest, model: str) -> EmbeddingResponse:
        items = _items(body)
        image_at = [i for i, item in enumerate(items) if not isinstance(item, str)]
        images = await self.fetch_images([items[i] for i in image_at]) if image_at else []
        for i, image in zip(image_at, images):
            items[i] = image
        embeddings = await self.embed(items, body.pooling)
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
