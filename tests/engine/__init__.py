"""Shared helpers for the engine bookkeeping tests (pure Python, no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fovea.engine.request import MultiModalFeature, Request


@dataclass
class Params:
    """The sampling fields the scheduler reads, named as in vLLM's SamplingParams."""

    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)


def image(offset: int, length: int, mm_hash: str, num_embeds: int | None = None) -> MultiModalFeature:
    is_embed = None if num_embeds is None else [i < num_embeds for i in range(length)]
    return MultiModalFeature("image", offset, length, mm_hash, data={}, is_embed=is_embed)


def make_request(
    request_id: str,
    prompt: list[int] | int,
    *,
    mm: list[MultiModalFeature] | None = None,
    eos: int | None = None,
    **params,
) -> Request:
    """`prompt` is the token ids, or a length (tokens 0..n-1)."""
    tokens = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
    return Request(request_id, tokens, Params(**params), eos_token_id=eos, mm_features=list(mm or []))
