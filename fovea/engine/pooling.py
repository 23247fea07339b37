"""Image embeddings from a BLIP-2 checkpoint: what `LLM.embed` and `/v1/embeddings` return.

BLIP-2 embeds images, not text (its Q-Former reads no text in a `Blip2ForConditionalGeneration`), so every input
must hold exactly one image. `pooling` picks the stage, each one transformers' method on the same checkpoint:

    "vision"     (1 + P, Dv)   the ViT's output: `Blip2Model.get_image_features(...).last_hidden_state`
    "qformer"    (Q, Dq)       the Q-Former's query outputs: `Blip2Model.get_qformer_features(...)`
    "projected"  (Q, hidden)   the queries in the LM's input space (default; what generation reads):
                               `Blip2ForConditionalGeneration.get_image_features(...).pooler_output`

An embedding is the whole (rows, dim) matrix, one row per token (vLLM's "token_embed" shape), never
averaged: BLIP-2's features are per query and a mean has no meaning in its training.
All images of a call run as batches of up to `max_num_seqs` through one forward each, not one per input; an image
already embedded with the same pooling (same content hash) comes from the `EmbeddingCache` without running the
model, and an image repeated within a call runs once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from fovea.engine.embedding_cache import EmbeddingCache, embed_through_cache
from fovea.models.blip2_qformer import Blip2QFormerModel

POOLING_STAGES = ("projected", "qformer", "vision")
DEFAULT_POOLING = "projected"


@dataclass(slots=True)
class EmbeddingOutput:
    embedding: torch.Tensor
    """(rows, dim) float32, one row per token of the chosen stage."""


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """One input's result, as vLLM's `EmbeddingRequestOutput` (request_id, outputs.embedding)."""

    request_id: str
    outputs: EmbeddingOutput


@dataclass(slots=True)
class ScoringOutput:
    score: float


@dataclass(slots=True)
class ScoringRequestOutput:
    """One (image, text) pair's score, as vLLM's `ScoringRequestOutput` (request_id, outputs.score)."""

    request_id: str
    outputs: ScoringOutput


def check_pooling(pooling: str | None) -> str:
    pooling = DEFAULT_POOLING if pooling is None else pooling
    if pooling not in POOLING_STAGES:
        raise ValueError(f"unknown pooling {pooling!r}; this model offers {', '.join(POOLING_STAGES)}")
    return pooling


def image_of(item: Any, index: int) -> Image.Image:
    """The one image an input holds: a PIL image, or vLLM's {"prompt": ..., "multi_modal_data": {"image": img}}."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):
        images = (item.get("multi_modal_data") or {}).get("image")
        if isinstance(images, list) and len(images) == 1:
            images = images[0]
        if isinstance(images, Image.Image):
            if item.get("prompt") or item.get("prompt_token_ids"):
                raise ValueError(f"input {index}: BLIP-2 embeds the image alone; give an empty prompt, not text")
            return images
        if isinstance(images, list):
            raise ValueError(f"input {index}: {len(images)} images; an embedding input holds exactly one")
    raise ValueError(f"input {index}: BLIP-2 embeddings need an image (a PIL image or "
                     f"{{'multi_modal_data': {{'image': image}}}}); text-only inputs cannot be embedded by this model")


@torch.no_grad()
def embed_pixels(model: torch.nn.Module, pixel_values: torch.Tensor, pooling: str,
                 max_batch: int) -> list[torch.Tensor]:
    """pixel_values (N, 3, H, W) -> N float32 (rows, dim) tensors of the `pooling` stage, `max_batch` at a time."""
    out = []
    for start in range(0, pixel_values.shape[0], max_batch):
        stages = model.image_feature_stages(pixel_values[start:start + max_batch])
        out.extend(getattr(stages, pooling).float().unbind(0))
    return out


def check_embeds_images(model_cls: type[torch.nn.Module]) -> None:
    """A ValueError unless the model class serves image embeddings (checked on the class: under tensor or
    pipeline parallelism the engine's process holds no model)."""
    # InstructBLIP's Q-Former reads the instruction, so its features are not the image's alone
    if not hasattr(model_cls, "image_feature_stages") or getattr(model_cls, "qformer_class", None) \
            is not Blip2QFormerModel:
        raise ValueError(f"{model_cls.__name__} does not serve embeddings; BLIP-2 checkpoints "
                         f"(Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval) do")


def check_embed_inputs(model_cls: type[torch.nn.Module], inputs: Sequence[Any], pooling: str | None
                       ) -> tuple[str, list[Image.Image]]:
    """The pooling and the one image of each input; a ValueError names the first bad one (nothing has run)."""
    pooling = check_pooling(pooling)
    check_embeds_images(model_cls)
    return pooling, [image_of(item, i) for i, item in enumerate(inputs)]


PixelEmbedder = Callable[[torch.Tensor, str], list[torch.Tensor]]
"""(pixel_values (N, 3, H, W), pooling) -> N float32 (rows, dim) tensors: `embed_pixels` on the model, wherever
it runs (the engine's process, or the first pipeline stage's worker: `EngineCore.embed_pixels`)."""


def embed_images(run: PixelEmbedder, image_processor, images: Sequence[Image.Image], pooling: str,
                 cache: EmbeddingCache | None = None) -> list[torch.Tensor]:
    """One float32 (rows, dim) embedding per image (already checked): cached ones from `cache`, the distinct
    others preprocessed and run by `run`, then kept. Each result is the caller's own copy."""
    return embed_through_cache(cache, pooling, images, lambda missing: run(
        image_processor(missing)["pixel_values"], pooling))
