"""Persimmon (Adept 2023), the language model of Fuyu: a pre-norm decoder like Llama's (llama.py), except

- LayerNorm with a bias everywhere (`input_layernorm`, `post_attention_layernorm`, `final_layernorm`), not RMSNorm;
- one fused `query_key_value` projection whose output is laid out per head as (q, k, v) [H, 3, D], not the
  [3, H, D] of a packed Llama projection, with biases on it and on the output `dense`;
- `qk_layernorm`: a LayerNorm over each head's query and key (head_dim wide, shared by the heads) before rotary;
- partial rotary: only the first `partial_rotary_factor * head_dim` features of each head are rotated;
- a plain two-layer MLP (`dense_h_to_4h` -> squared ReLU -> `dense_4h_to_h`) instead of SwiGLU.

Parameter names are transformers' `PersimmonForCausalLM` (`model.layers.N.self_attn.query_key_value`, ...); the
MLP's two layers load into the shared `MLP` block's fc1 / fc2.
"""
from __future__ import annotations

import torch
from torch import nn

from fovea.layers.attention import Attention
from fovea.layers.linear import Linear
from fovea.layers.mlp import MLP
from fovea.layers.rotary import RotaryEmbedding, apply_partial_rotary, rope_parameters
from fovea.models.utils import TokenEmbeddingsMixin

_MLP_NAMES = {".mlp.dense_h_to_4h.": ".mlp.fc1.", ".mlp.dense_4h_to_h.": ".mlp.fc2."}


def rotary_dim_of(config) -> int:
    """How many features of each head are rotated: `partial_rotary_factor` of head_dim (Persimmon: half)."""
    head_dim = config.hidden_size // config.num_attention_heads
    factor = rope_parameters(config).get("partial_rotary_factor",
                                         getattr(config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * factor)
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"partial_rotary_factor={factor} of head_dim {head_dim} gives {rotary_dim} rotary "
                         f"features; it must be a positive even number")
    return rotary_dim


class PersimmonAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, self.num_heads = config.hidden_size, config.num_attention_heads
        if hidden % self.num_heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {self.num_heads}")
        self.head_dim = hidden // self.num_heads
        self.query_key_value = Linear(hidden, 3 * hidden, bias=True)
        self.dense = Linear(hidden, hidden, bias=True)
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.attn = Attention(self.num_heads, self.head_dim, scale=self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, hidden]; cos, sin [N, rotary_dim]
        qkv = self.query_key_value(x).view(x.shape[0], self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(2)  # each (N, nh, hs)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        out = self.attn(q.reshape(x.shape[0], -1), k.reshape(x.shape[0], -1), v.reshape(x.shape[0], -1))
        return self.dense(out)


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PersimmonAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class PersimmonModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        params = rope_parameters(config, ("default",))  # plain RoPE only: scaled types are refused, not silently ignored
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = RotaryEmbedding(rotary_dim_of(config), params["rope_theta"])

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(positions, inputs_embeds.dtype)  # (N, rotary_dim) each
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.final_layernorm(x)


class PersimmonForCausalLM(TokenEmbeddingsMixin, nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = PersimmonModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_text_config(self):
        return self.config

    def rename_checkpoint_weight(self, name: str) -> str | None:
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None  # the same tensor as embed_tokens
        if name.endswith(("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")):
            return None  # recomputed; older checkpoints store them
        for old, new in _MLP_NAMES.items():
            name = name.replace(old, new)
        return name

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(self.resolve_inputs_embeds(input_ids, inputs_embeds), positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab]
        return self.lm_head(hidden_states)
