"""Qwen2 (Qwen Team 2024): Llama's decoder (fovea.models.llama) with biases on the q/k/v projections only.

Parameter names follow transformers' `Qwen2ForCausalLM`, packed as Llama's (`qkv_proj`, `gate_up_proj`).
`Qwen2Model` is also the language model of Qwen2.5-VL, which only swaps 1-D RoPE for M-RoPE: positions are
[N] here and [3, N] there, and the rotary module built by the caller decides which.
"""
from __future__ import annotations

from fovea.layers.rotary import RotaryEmbedding, rope_parameters
from fovea.models.llama import LlamaForCausalLM, LlamaModel, head_dim_of

__all__ = ["Qwen2ForCausalLM", "Qwen2Model", "check_full_attention", "head_dim_of"]


def check_full_attention(config) -> None:
    """fovea's paged attention is causal over the whole context; sliding-window layers would differ."""
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise ValueError("this checkpoint uses sliding-window attention (use_sliding_window / layer_types), "
                         "which fovea does not implement")


class Qwen2Model(LlamaModel):
    def __init__(self, config, rotary: RotaryEmbedding):
        check_full_attention(config)
        super().__init__(config, rotary, qkv_bias=True, o_bias=False, mlp_bias=False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def build_model(config) -> Qwen2Model:
        rope = rope_parameters(config)  # plain RoPE only: scaled types are refused, not silently ignored
        return Qwen2Model(config, RotaryEmbedding(head_dim_of(config), rope["rope_theta"]))
