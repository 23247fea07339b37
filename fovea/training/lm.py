"""fovea's OPT run as a padded batch with autograd, for training through it (stage 2) or training it.

The engine's `OPTForCausalLM` runs a flat batch against the paged KV cache. Training needs (B, L) padded
batches, gradients, and no cache; this walks the same modules (same parameters, so the strict loader and the
checkpoint names are the engine's) with plain SDPA under a causal + padding mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fovea.models.opt import POSITION_OFFSET, OPTAttention, OPTDecoderLayer, OPTForCausalLM


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1 = real token -> (B, 1, L, L) bool, True where row may attend to column: earlier-or-same
    real tokens. Every row also sees itself, so a padding row is never empty (its output is unused)."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=causal.device)
    return causal[None, None] & keys


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L) long: 0 at the first real token, counting real tokens only (left or right padding),
    as transformers' OPT does."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _attention(attn: OPTAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    heads, head_dim = attn.attn.num_heads, attn.attn.head_dim
    q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2)
               for t in attn.qkv_proj.split(attn.qkv_proj(x)))  # each (B, nh, L, hs)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.attn.scale)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim))


def _layer(layer: OPTDecoderLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if layer.do_layer_norm_before:
        x = x + _attention(layer.self_attn, layer.self_attn_layer_norm(x), mask)
        return x + layer.fc2(layer.act(layer.fc1(layer.final_layer_norm(x))))
    x = layer.self_attn_layer_norm(x + _attention(layer.self_attn, x, mask))
    return layer.final_layer_norm(x + layer.fc2(layer.act(layer.fc1(x))))


def opt_logits(lm: OPTForCausalLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               gradient_checkpointing: bool = False) -> torch.Tensor:
    """inputs_embeds (B, L, word_embed_proj_dim), attention_mask (B, L) -> logits (B, L, V)."""
    decoder = lm.model.decoder
    x = inputs_embeds if decoder.project_in is None else decoder.project_in(inputs_embeds)
    x = x + decoder.embed_positions(positions_from_mask(attention_mask) + POSITION_OFFSET)
    mask = causal_padding_mask(attention_mask)
    for layer in decoder.layers:
        if gradient_checkpointing and torch.is_grad_enabled():
            x = checkpoint(_layer, layer, x, mask, use_reentrant=False)
        else:
            x = _layer(layer, x, mask)
    if decoder.final_layer_norm is not None:
        x = decoder.final_layer_norm(x)
    if decoder.project_out is not None:
        x = decoder.project_out(x)
    return lm.lm_head(x)
