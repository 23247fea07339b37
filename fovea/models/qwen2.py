"""Qwen2 (Qwen Team 2024): a pre-norm decoder with grouped-query attention, q/k/v bias, SwiGLU and RMSNorm.

Parameter names follow transformers' `Qwen2ForCausalLM` (`model.layers.N...`), except that each layer's
q/k/v projections are packed into `qkv_proj` and the MLP's gate/up projections into `gate_up_proj` (one
matmul each instead of three and two).

`Qwen2Model` is also the language model of Qwen2.5-VL, which only swaps 1-D RoPE for M-RoPE: positions are
[N] here and [3, N] there, and the rotary module built by the caller decides which.
"""
from __future__ import annotations

import torch
from torch import nn

from fovea.layers.attention import Attention
from fovea.layers.linear import Linear, PackedLinear
from fovea.layers.mlp import GatedMLP
from fovea.layers.norms import RMSNorm
from fovea.layers.rotary import RotaryEmbedding, apply_rotary_packed, rope_parameters
from fovea.models.utils import TokenEmbeddingsMixin


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_full_attention(config) -> None:
    """fovea's paged attention is causal over the whole context; sliding-window layers would differ."""
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise ValueError("this checkpoint uses sliding-window attention (use_sliding_window / layer_types), "
                         "which fovea does not implement")


class Qwen2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shards = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.qkv_proj = PackedLinear(config.hidden_size, shards, bias=True)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.attn = Attention(self.num_heads, self.head_dim, scale=self.head_dim**-0.5, num_kv_heads=self.num_kv_heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, hidden]; cos, sin [N, head_dim]
        qkv = apply_rotary_packed(self.qkv_proj(x), cos, sin, self.num_heads + self.num_kv_heads)
        q, k, v = self.qkv_proj.split(qkv)  # (N, nh*hs), (N, nkv*hs), (N, nkv*hs)
        return self.o_proj(self.attn(q, k, v))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        check_full_attention(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = rotary

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # inputs_embeds [N, hidden]; positions [N] (or [3, N] for M-RoPE), each request's own
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class Qwen2ForCausalLM(TokenEmbeddingsMixin, nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, config):
        super().__init__()
        self.config = config
        rope = rope_parameters(config)
        self.model = Qwen2Model(config, RotaryEmbedding(head_dim_of(config), rope["rope_theta"]))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_text_config(self):
        return self.config

    def rename_checkpoint_weight(self, name: str) -> str | None:
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None  # the same tensor as embed_tokens; some checkpoints store both
        return name

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs_embeds = self.resolve_inputs_embeds(input_ids, inputs_embeds)
        return self.model(inputs_embeds, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [n, hidden]
        return self.lm_head(hidden_states)  # [n, vocab]
