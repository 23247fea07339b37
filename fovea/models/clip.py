"""CLIP's vision tower (Radford et al. 2021), as LLaVA reads it: the hidden states of chosen layers.

A pre-LN ViT: patch embedding (no bias) + a learned class embedding + learned positions, a `pre_layrnorm`
(transformers' spelling) before the blocks, and blocks of layer_norm1 -> attention -> layer_norm2 -> MLP
(`quick_gelu` or `gelu` per config). What differs from BLIP's ViT: q/k/v are separate projections in the
checkpoint (packed here into `qkv_proj`), the class embedding is a [D] vector, the positions an embedding
table, and there is the pre-LN. The MLP (`layers/mlp.py`) and the attention core (`layers/encoder_attention.py`)
are the shared ones.

`CLIPVisionTower` runs only as many blocks as its deepest feature layer needs and returns the selected hidden
states (`hidden_states[i]`: 0 is the embeddings after `pre_layrnorm`, i the output of block i; negative
indices count from the end as in Python; a list of layers is concatenated along features, as transformers'
LLaVA does). `post_layernorm` is never applied to those, so its weights (and those of unused blocks) are not
loaded (`skipped_checkpoint_prefixes`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fovea.layers.encoder_attention import encoder_attention
from fovea.layers.linear import Linear, PackedLinear
from fovea.layers.mlp import MLP


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.num_patches = (config.image_size // patch) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding(self.num_patches + 1, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W]
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + P, D)


class CLIPAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        if dim % self.num_heads:
            raise ValueError(f"vision hidden_size {dim} is not a multiple of num_attention_heads {self.num_heads}")
        self.scale = (dim // self.num_heads) ** -0.5
        self.qkv_proj = PackedLinear(dim, {"q_proj": dim, "k_proj": dim, "v_proj": dim}, bias=True)
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))  # each (B, T, D), views
        return self.out_proj(encoder_attention(q, k, v, self.num_heads, self.scale))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


def feature_layer_indices(vision_feature_layer: int | Sequence[int], num_hidden_layers: int) -> list[int]:
    """`vision_feature_layer` (an int or a list, negatives from the end) as indices into the
    num_hidden_layers + 1 hidden states; anything out of range is a ValueError naming the allowed range."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    if not layers:
        raise ValueError("vision_feature_layer is an empty list; give a layer index or a non-empty list")
    count = num_hidden_layers + 1
    indices = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
            raise ValueError(f"vision_feature_layer {layer!r} is out of range: the vision tower has {count} hidden "
                             f"states (embeddings + {num_hidden_layers} layers), so use -{count} .. {count - 1}")
        indices.append(layer % count)
    return indices


class CLIPVisionTower(nn.Module):
    """pixel_values [B, 3, S, S] -> the selected hidden states [B, T, D * len(layers)], T = 1 + P (`full`) or
    P (`default`: the class token dropped)."""

    def __init__(self, config, vision_feature_layer: int | Sequence[int], select_strategy: str):
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {select_strategy!r} is not one of 'default' (drop the "
                             f"class token) or 'full'")
        self.feature_layers = feature_layer_indices(vision_feature_layer, config.num_hidden_layers)
        self.drop_class_token = select_strategy == "default"
        self.num_hidden_layers = config.num_hidden_layers
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, max(self.feature_layers))

    @property
    def num_output_tokens(self) -> int:
        return self.embeddings.num_patches + (0 if self.drop_class_token else 1)

    @property
    def output_width(self) -> int:
        return self.embeddings.class_embedding.shape[0] * len(self.feature_layers)

    def skipped_checkpoint_prefixes(self) -> tuple[str, ...]:
        """Checkpoint names (relative to the tower) whose tensors the selected features never use."""
        unused = range(len(self.encoder.layers), self.num_hidden_layers)
        return ("post_layernorm.",) + tuple(f"encoder.layers.{i}." for i in unused)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.embeddings.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [num_images, 3, {size}, {size}], got {list(pixel_values.shape)}")
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            if i in self.feature_layers:
                states[i] = x
        selected = [states[i][:, 1:] if self.drop_class_token else states[i] for i in self.feature_layers]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
