"""The runner's part of encoder-decoder models (fovea.engine.encoder_decoder has the scheduler's).

In the step that admits a request (or resumes it after a preemption) its encoder runs over the whole encoder
prompt, image rows merged, batched with the other requests admitted in the same step (padded; the padding is
masked out of every key), and each decoder layer writes that output's keys/values into the request's cross
blocks. The decoder steps then read them through `AttentionMetadata.cross`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fovea.engine.request import MultiModalFeature
from fovea.layers.attention import AttentionMetadata
from fovea.layers.cross_attention import build_cross_attention_metadata


def cross_slot_mapping(block_ids: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """KV slots of encoder positions [0, num_tokens) in a cross block table."""
    pos = torch.arange(num_tokens)
    return torch.tensor(block_ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def run_encoder_prompts(model: nn.Module, prompts: Sequence[tuple[list[int], list[MultiModalFeature], list[int]]],
                        block_size: int, mm_rows: Callable[[MultiModalFeature], tuple[torch.Tensor, torch.Tensor]]
                        ) -> None:
    """Encode each (encoder token ids, its multimodal items, its cross block ids) and store the cross K/V.

    `mm_rows(feature)` gives an item's embedding rows and which of its placeholder positions take them."""
    ids, is_mm, rows = [], [], []
    for token_ids, features, _ in prompts:
        mask = torch.zeros(len(token_ids), dtype=torch.bool)
        for f in features:
            item_rows, local = mm_rows(f)
            mask[f.offset:f.offset + f.length] = local
            rows.append(item_rows)
        ids.extend(token_ids)
        is_mm.append(mask)
    flat = torch.tensor(ids, dtype=torch.long)
    embeds = model.embed_input_ids(flat, rows or None, torch.cat(is_mm) if rows else None)  # (sum L, d)
    lengths = [len(p[0]) for p in prompts]
    states = model.encode(embeds, lengths)  # (sum L, d): no padding outside self-attention
    slots = torch.cat([cross_slot_mapping(p[2], n, block_size) for p, n in zip(prompts, lengths)])
    model.store_cross_kv(states, slots)


def attach_cross_metadata(meta: AttentionMetadata, query_lens: list[int], encoder_lens: list[int],
                          cross_tables: list[list[int]], block_size: int) -> AttentionMetadata:
    meta.cross = build_cross_attention_metadata(query_lens, encoder_lens, cross_tables, block_size)
    return meta


def profile_step(model: nn.Module, num_tokens: int, num_encoder_tokens: int, block_size: int,
                 first_cross_block: int) -> None:
    """A worst-case encoder-decoder step for memory profiling: one encoder prompt of `num_encoder_tokens`
    (its cross K/V in blocks from `first_cross_block` on), and `num_tokens` decoder tokens over it."""
    from fovea.layers.attention import build_attention_metadata, forward_context

    num_cross_blocks = -(-num_encoder_tokens // block_size)
    cross = list(range(first_cross_block, first_cross_block + num_cross_blocks))
    run_encoder_prompts(model, [([0] * num_encoder_tokens, [], cross)], block_size, mm_rows=None)
    num_blocks = -(-num_tokens // block_size)
    meta = build_attention_metadata([num_tokens], [num_tokens], [list(range(num_blocks))], block_size)
    attach_cross_metadata(meta, [num_tokens], [num_encoder_tokens], [cross], block_size)
    ids = torch.zeros(num_tokens, dtype=torch.long)
    with forward_context(meta):
        hidden = model(ids, torch.arange(num_tokens), inputs_embeds=model.embed_input_ids(ids))
    model.compute_logits(hidden[-1:])
