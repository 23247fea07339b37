"""Helpers shared by model files."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def merge_multimodal_embeddings(
    inputs_embeds: torch.Tensor, mm_embeds: Sequence[torch.Tensor] | torch.Tensor, is_multimodal: torch.Tensor
) -> torch.Tensor:
    """Put the rows of `torch.cat(mm_embeds)`, in order, where `is_multimodal` is True.

    inputs_embeds [N, D] token embeddings; mm_embeds: tensors [n_i, D] (one per item, in prompt order);
    is_multimodal [N] bool with sum(n_i) True entries. Returns a new [N, D] tensor.
    """
    if isinstance(mm_embeds, torch.Tensor):
        rows = mm_embeds.reshape(-1, mm_embeds.shape[-1])
    elif len(mm_embeds) > 0:
        rows = torch.cat(list(mm_embeds))
    else:
        rows = inputs_embeds.new_empty(0, inputs_embeds.shape[-1])
    if is_multimodal.shape != inputs_embeds.shape[:1]:
        raise ValueError(f"is_multimodal has shape {tuple(is_multimodal.shape)}, expected ({inputs_embeds.shape[0]},)")
    num_positions = int(is_multimodal.sum())
    if num_positions != rows.shape[0]:
        raise ValueError(f"{num_positions} placeholder positions but {rows.shape[0]} multimodal embedding rows")
    if num_positions == 0:
        return inputs_embeds
    if rows.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(
            f"multimodal embeddings have width {rows.shape[-1]}, the token embeddings {inputs_embeds.shape[-1]}"
        )
    mask = is_multimodal.to(device=inputs_embeds.device, dtype=torch.bool).unsqueeze(-1)
    return inputs_embeds.masked_scatter(mask, rows.to(inputs_embeds.dtype))


class TokenEmbeddingsMixin:
    """`embed_input_ids` and the input-embeddings fallback of `forward`, for any model whose token table is
    returned by `get_input_embeddings()`."""

    def get_input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        mm_embeds: Sequence[torch.Tensor] | None = None,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)  # [N, D]
        if is_multimodal is None:
            if mm_embeds:
                raise ValueError("mm_embeds given without is_multimodal")
            return embeds
        return merge_multimodal_embeddings(embeds, mm_embeds or [], is_multimodal)

    def resolve_inputs_embeds(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids is None:
            raise ValueError("forward needs input_ids or inputs_embeds")
        return self.get_input_embeddings()(input_ids)
