"""BLIP-2's multimodal processing: one image per prompt, `num_query_tokens` image tokens before BOS.

Equal to transformers' `Blip2Processor`: the text is tokenized as usual (BOS first), the image tokens are
prepended to it, and pixels go through BLIP's PIL preprocessing (fovea's own `BlipImageProcessor`).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from fovea.multimodal.processors import BlipImageProcessor
from fovea.multimodal.processing import (
    preprocess_images_or_embeds,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    MultiModalFieldConfig,
    PromptInsertion,
    PromptIndexTargets,
    PromptUpdate,
)
from fovea.multimodal.profiling import BaseDummyInputsBuilder


class Blip2ProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1}

    def get_num_image_tokens(self) -> int:
        return self.get_hf_config().num_query_tokens

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}

    def get_image_token_id(self) -> int:
        config = self.get_hf_config()
        token_id = getattr(config, "image_token_index", None)
        if token_id is None:
            token_id = getattr(config, "image_token_id", None)
        if token_id is None:
            token_id = self.get_tokenizer().convert_tokens_to_ids("<image>")
        return token_id

    @functools.cached_property
    def image_processor(self) -> BlipImageProcessor:
        return BlipImageProcessor.from_pretrained(self.ctx.model_dir)

    def get_image_size(self) -> int:
        return self.get_hf_config().vision_config.image_size

    def get_embed_shape(self) -> tuple[int, int]:
        """Shape of one image's pre-computed `image_embeds` (after language_projection)."""
        config = self.get_hf_config()
        return config.num_query_tokens, config.text_config.hidden_size


class Blip2DummyInputsBuilder(BaseDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""  # the processor inserts the image tokens itself

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int]) -> dict[str, list[Any]]:
        size = self.info.get_image_size()
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0))}


class Blip2MultiModalProcessor(BaseMultiModalProcessor):
    info: Blip2ProcessingInfo

    def _preprocess(self, mm_items: Mapping[str, list[Any]], mm_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return preprocess_images_or_embeds(mm_items.get("image", []), self.info.image_processor, model="BLIP-2",
                                           embed_shape=self.info.get_embed_shape(),
                                           embed_dims="num_query_tokens, text hidden size")

    def _get_mm_fields_config(self, processed, mm_kwargs) -> dict[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image"),
                "image_embeds": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_counts, processed, mm_kwargs) -> list[PromptUpdate]:
        image_tokens = [self.info.get_image_token_id()] * self.info.get_num_image_tokens()
        return [PromptInsertion("image", PromptIndexTargets.start(), lambda item: image_tokens)]
