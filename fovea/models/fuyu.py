"""Fuyu (Adept 2023): a decoder-only multimodal model with no vision tower.

What Fuyu adds over its language model (persimmon.py):
- `vision_embed_tokens`: one linear layer from a flattened patch of pixels (patch_size^2 * 3 values, see
  fovea.multimodal.processors.fuyu) straight to the LM's hidden size; an image's embeddings are these
  projections, one per patch, row-major;
- they replace the image's `|SPEAKER|` placeholders; the `|NEWLINE|` ending each row of patches and the `<s>`
  after the image keep their token embeddings (the `is_embed` mask of fuyu_processing.py).

Parameter names follow the checkpoints transformers writes (`vision_embed_tokens.`, `language_model.model.`,
`language_model.lm_head.`, as adept/fuyu-8b); transformers 5's module names (`model.vision_embed_tokens.`,
`model.language_model.`, `lm_head.`) load too.
"""
from __future__ import annotations

import torch
from torch import nn

from fovea.layers.linear import Linear
from fovea.models.fuyu_processing import FuyuDummyInputsBuilder, FuyuMultiModalProcessor, FuyuProcessingInfo
from fovea.models.interfaces import SupportsMultiModal
from fovea.models.persimmon import PersimmonForCausalLM
from fovea.multimodal.registry import MULTIMODAL_REGISTRY

# (checkpoint prefix, fovea prefix): transformers 5 module names onto the saved layout
_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_embed_tokens.", "vision_embed_tokens."),
    ("lm_head.", "language_model.lm_head."),
)


@MULTIMODAL_REGISTRY.register_processor(
    FuyuMultiModalProcessor, info=FuyuProcessingInfo, dummy_inputs=FuyuDummyInputsBuilder
)
class FuyuForCausalLM(nn.Module, SupportsMultiModal):
    def __init__(self, config):
        super().__init__()
        text_config = config.text_config
        if text_config.model_type != "persimmon":
            raise ValueError(f"fovea's Fuyu runs a Persimmon language model, not {text_config.model_type!r}")
        self.config = config
        patch_width = config.patch_size * config.patch_size * config.num_channels
        self.vision_embed_tokens = Linear(patch_width, text_config.hidden_size, bias=True)
        self.language_model = PersimmonForCausalLM(text_config)

    def get_text_config(self):
        return self.config.text_config

    def rename_checkpoint_weight(self, name: str) -> str | None:
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        prefix = "language_model."
        if name.startswith(prefix):
            inner = self.language_model.rename_checkpoint_weight(name[len(prefix):])
            return None if inner is None else prefix + inner
        return name

    def embed_multimodal(self, pixel_values: torch.Tensor | None = None,
                         image_grid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One [rows * columns, hidden] tensor per image, from the patches of all images concatenated
        (`pixel_values` [sum of patches, patch_size^2 * 3]) and each image's patch grid (`image_grid` [n, 2])."""
        if pixel_values is None:
            return []
        if image_grid is None:
            raise ValueError("pixel_values needs image_grid (rows and columns of each image) to split it per image")
        num_patches = image_grid.prod(-1).tolist()
        if sum(num_patches) != pixel_values.shape[0]:
            raise ValueError(f"image_grid {image_grid.tolist()} covers {sum(num_patches)} patches but pixel_values "
                             f"has {pixel_values.shape[0]}")
        return list(self.vision_embed_tokens(pixel_values).split(num_patches))

    def embed_input_ids(self, input_ids: torch.Tensor, mm_embeds: list[torch.Tensor] | None = None,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids, mm_embeds, is_multimodal)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)
