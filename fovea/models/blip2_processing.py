"""BLIP-2's multimodal processing: one image per prompt, `num_query_tokens` image tokens before BOS.

Equal to transformers' `Blip2Processor`: the text is tokenized as usual (BOS first), the image tokens are
prepended to it, and pixels go through BLIP's PIL preprocessing (fovea's own `BlipImageProcessor`).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from fovea.multimodal.processors import BlipImageProcessor
from fovea.multimodal.media import ACCEPTED_IMAGE_INPUTS, type_name
from fovea.multimodal.processing import (
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
        images = mm_items.get("image", [])
        for item in images:  # the input processor has decoded every image; what is left is embeddings or wrong
            if not isinstance(item, (Image.Image, torch.Tensor)):
                given = f"a dict with keys {sorted(map(str, item))}" if isinstance(item, Mapping) else type_name(item)
                raise ValueError(f"BLIP-2 cannot take {given} as an image; pass an image ({ACCEPTED_IMAGE_INPUTS}), "
                                 f"or precomputed image_embeds as a torch.Tensor of shape "
                                 f"{list(self.info.get_embed_shape())} (num_query_tokens, text hidden size)")
        pixels = [im for im in images if not isinstance(im, torch.Tensor)]
        embeds = [im for im in images if isinstance(im, torch.Tensor)]
        if pixels and embeds:
            raise ValueError("one prompt cannot mix images and pre-computed image_embeds")
        if embeds:
            return {"image_embeds": torch.stack([self._check_embeds(e) for e in embeds])}
        return self.info.image_processor(pixels)

    def _check_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        expected = self.info.get_embed_shape()
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if tuple(embeds.shape) != expected:
            raise ValueError(
                f"image_embeds has shape {tuple(embeds.shape)}; BLIP-2 expects {expected} per image "
                f"(num_query_tokens, text hidden size), optionally with a leading batch dimension of 1"
            )
        return embeds

    def _get_mm_fields_config(self, processed, mm_kwargs) -> dict[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image"),
                "image_embeds": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_counts, processed, mm_kwargs) -> list[PromptUpdate]:
        image_tokens = [self.info.get_image_token_id()] * self.info.get_num_image_tokens()
        return [PromptInsertion("image", PromptIndexTargets.start(), lambda item: image_tokens)]
