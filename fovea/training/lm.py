"""fovea's OPT run as a padded batch with autograd, for training through it (stage 2) or training it.

The engine's `OPTForCausalLM` itself, without a KV cache: under a `DenseAttentionMetadata` context its
attention layers run causal SDPA over each padded row (`fovea.layers.attention`), so training, the engine and
the exported checkpoints share one implementation and one set of parameter names.
"""
from __future__ import annotations

import torch

from fovea.layers.attention import DenseAttentionMetadata, forward_context
from fovea.models.opt import OPTForCausalLM


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L) long: 0 at the first real token, counting real tokens only (left or right padding),
    as transformers' OPT does."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def opt_logits(lm: OPTForCausalLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               gradient_checkpointing: bool = False) -> torch.Tensor:
    """inputs_embeds (B, L, word_embed_proj_dim), attention_mask (B, L) 1 = real -> logits (B, L, V)."""
    lm.model.decoder.gradient_checkpointing = gradient_checkpointing
    with forward_context(DenseAttentionMetadata.from_padding(attention_mask)):
        hidden = lm(None, positions_from_mask(attention_mask), inputs_embeds)  # (B, L, word_embed_proj_dim)
    return lm.compute_logits(hidden)
