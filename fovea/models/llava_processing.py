"""LLaVA-1.5's multimodal processing: each `<image>` in the prompt becomes one placeholder per image feature.

Equal to transformers' `LlavaProcessor`: the text is tokenized as usual, every image token is repeated
`num_image_tokens` times ((image_size / patch_size)^2, plus the class token under the `full` strategy), and
pixels go through CLIP's PIL preprocessing (fovea's `CLIPImageProcessor`). Images may be several per prompt;
pre-computed `image_embeds` (projector outputs, [num_image_tokens, text hidden size]) stand in for pixels.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from fovea.multimodal.processing import (
    preprocess_images_or_embeds,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    MultiModalFieldConfig,
    MultiModalInputs,
    PromptReplacement,
    PromptUpdate,
)
from fovea.multimodal.processors import CLIPImageProcessor, get_image_processor
from fovea.multimodal.profiling import BaseDummyInputsBuilder


class LlavaProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self) -> int:
        config = self.get_hf_config()
        vision = config.vision_config
        num_patches = (vision.image_size // vision.patch_size) ** 2
        return num_patches + (1 if config.vision_feature_select_strategy == "full" else 0)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}

    def get_image_token_id(self) -> int:
        config = self.get_hf_config()
        token_id = getattr(config, "image_token_id", None)
        return token_id if token_id is not None else config.image_token_index

    @functools.cached_property
    def image_processor(self) -> CLIPImageProcessor:
        processor = get_image_processor(self.ctx.model_dir)
        if not isinstance(processor, CLIPImageProcessor):
            raise ValueError(f"LLaVA-1.5 takes CLIP's image processor; this checkpoint names "
                             f"{type(processor).__name__}")
        size = self.get_hf_config().vision_config.image_size
        if processor.output_size() not in (None, (size, size)):
            raise ValueError(f"the image processor makes {processor.output_size()} images but the vision tower "
                             f"takes {size} x {size}")
        return processor

    def get_embed_shape(self) -> tuple[int, int]:
        """Shape of one image's pre-computed `image_embeds` (after the projector)."""
        return self.get_num_image_tokens(), self.get_hf_config().text_config.hidden_size


class LlavaDummyInputsBuilder(BaseDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        token = self.info.get_tokenizer().convert_ids_to_tokens(self.info.get_image_token_id())
        return token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int]) -> dict[str, list[Any]]:
        size = self.info.get_hf_config().vision_config.image_size  # every image is cropped to this: all cost the same
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0))}


class LlavaMultiModalProcessor(BaseMultiModalProcessor):
    info: LlavaProcessingInfo

    def _preprocess(self, mm_items: Mapping[str, list[Any]], mm_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return preprocess_images_or_embeds(mm_items.get("image", []), self.info.image_processor, model="LLaVA",
                                           embed_shape=self.info.get_embed_shape(),
                                           embed_dims="image tokens, text hidden size")

    def _get_mm_fields_config(self, processed, mm_kwargs) -> dict[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image"),
                "image_embeds": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_counts, processed, mm_kwargs) -> list[PromptUpdate]:
        token_id = self.info.get_image_token_id()
        expanded = [token_id] * self.info.get_num_image_tokens()
        return [PromptReplacement("image", [token_id], lambda item: expanded)]

    def apply(self, prompt, mm_items, mm_hashes, mm_kwargs=None) -> MultiModalInputs:
        """As the base class, then one more check: every image token of the result is one of an image's
        placeholders. An `<image>` in a prompt without images (or one already expanded) would otherwise reach
        the LM as a plain token, where transformers refuses it."""
        inputs = super().apply(prompt, mm_items, mm_hashes, mm_kwargs)
        token_id = self.info.get_image_token_id()
        num_tokens = sum(t == token_id for t in inputs.prompt_token_ids)
        num_placeholders = sum(f.length for f in inputs.mm_features)
        if num_tokens != num_placeholders:
            num_images = len(mm_items.get("image", []))
            raise ValueError(f"the prompt holds {num_tokens - num_placeholders} image token(s) "
                             f"(id {token_id}) that no image fills; with {num_images} image(s) given, put exactly "
                             f"one image token per image in the prompt (fovea expands it to "
                             f"{self._expansion()})")
        return inputs

    def _expansion(self) -> str:
        """How many placeholders one image token becomes, for the error above."""
        return f"{self.info.get_num_image_tokens()} placeholders"
