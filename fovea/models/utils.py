"""Helpers shared by model files."""
from __future__ import annotations

from collections.abc import Sequence

import torch


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
