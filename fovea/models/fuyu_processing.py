"""Fuyu's multimodal processing: the image goes in front of the prompt as rows of patch placeholders, each row
ended by a newline token that takes no features.

Equal to transformers' `FuyuProcessor` for a prompt `text` and one image of R x C patches:

    (|SPEAKER| * C + |NEWLINE|) * R   <s>   tokens(text)   <0x04>

`|SPEAKER|` positions receive the image's patch embeddings in order; the `|NEWLINE|`s and the `<s>` are part of
the placeholder range (`full`) but keep their own token embeddings (`is_embed` False), the `full` vs `features`
distinction of the processing framework. `<0x04>` is Fuyu's beginning-of-answer token. The text is tokenized
without the tokenizer's BOS, as transformers does when an image is given; a prompt given as token ids is taken
as those text tokens (the image rows, `<s>` and `<0x04>` are added around them the same way). A prompt without
an image is tokenized as the tokenizer does (its BOS, no `<0x04>`), as `FuyuProcessor` does; vLLM appends
`<0x04>` there too.

Fuyu takes one image per prompt (transformers' processor puts one image in front of each text), and the prompt
holds no placeholder of its own: a `|SPEAKER|` typed into it would be a placeholder no image fills, and is refused.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from fovea.multimodal.media import type_name
from fovea.multimodal.processing import (
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    MultiModalFieldConfig,
    MultiModalInputs,
    PromptIndexTargets,
    PromptInsertion,
    PromptUpdate,
    PromptUpdateDetails,
)
from fovea.multimodal.processors import FuyuImageProcessor, get_image_processor
from fovea.multimodal.profiling import BaseDummyInputsBuilder

IMAGE_TOKEN = "|SPEAKER|"
NEWLINE_TOKEN = "|NEWLINE|"
BOS_TOKEN = "<s>"
BEGINNING_OF_ANSWER_TOKEN = "<0x04>"


class FuyuProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1}

    @functools.cached_property
    def image_processor(self) -> FuyuImageProcessor:
        processor = get_image_processor(self.ctx.model_dir)
        if not isinstance(processor, FuyuImageProcessor):
            raise ValueError(f"Fuyu takes Fuyu's image processor; this checkpoint names {type(processor).__name__}")
        config = self.get_hf_config()
        if processor.patch_size != (config.patch_size, config.patch_size) or config.num_channels != 3:
            raise ValueError(f"the image processor cuts {processor.patch_size} patches of 3 channels but the model "
                             f"projects {config.patch_size} x {config.patch_size} patches of {config.num_channels}")
        return processor

    @functools.cached_property
    def token_ids(self) -> dict[str, int]:
        """The ids of Fuyu's framing tokens in this tokenizer (each must be one token of the vocabulary)."""
        vocab = self.get_tokenizer().get_vocab()
        names = (IMAGE_TOKEN, NEWLINE_TOKEN, BOS_TOKEN, BEGINNING_OF_ANSWER_TOKEN)
        missing = [name for name in names if name not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks Fuyu's token(s) {missing}; a Fuyu tokenizer has {list(names)}")
        ids = {name: vocab[name] for name in names}
        image_token_id = getattr(self.get_hf_config(), "image_token_id", None)
        if image_token_id is not None and image_token_id != ids[IMAGE_TOKEN]:
            raise ValueError(f"config.json's image_token_id {image_token_id} is not the tokenizer's {IMAGE_TOKEN} "
                             f"({ids[IMAGE_TOKEN]})")
        return ids

    def get_grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patches of an image of `height` x `width` pixels."""
        return self.image_processor.grid_size(height, width)

    def get_image_size_with_most_features(self) -> tuple[int, int]:
        """(height, width): larger images are shrunk to fit `size`, so `size` itself has the most patches."""
        return self.image_processor.size

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        rows, cols = self.get_grid_size(*self.get_image_size_with_most_features())
        return {"image": rows * cols}  # encoder rows; the placeholder run adds a newline per row and <s>

    def get_placeholder_ids(self, rows: int, cols: int) -> PromptUpdateDetails:
        ids = self.token_ids
        image, newline = ids[IMAGE_TOKEN], ids[NEWLINE_TOKEN]
        return PromptUpdateDetails.select_token_id(([image] * cols + [newline]) * rows + [ids[BOS_TOKEN]], image)


class FuyuDummyInputsBuilder(BaseDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""  # the processor puts the image in front itself

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int]) -> dict[str, list[Any]]:
        height, width = self.info.get_image_size_with_most_features()
        return {"image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0))}


class FuyuMultiModalProcessor(BaseMultiModalProcessor):
    info: FuyuProcessingInfo

    def _preprocess(self, mm_items: Mapping[str, list[Any]], mm_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images = mm_items.get("image", [])
        for item in images:
            if not isinstance(item, Image.Image):
                raise ValueError(f"Fuyu cannot take {type_name(item)} as an image: it has no vision tower, so there "
                                 f"are no pre-computed image embeddings to give; pass the image itself")
        return self.info.image_processor(images)

    def _get_mm_fields_config(self, processed, mm_kwargs) -> dict[str, MultiModalFieldConfig]:
        # pixel_values concatenates every image's patches; image_grid says how many rows each one owns
        num_patches = processed["image_grid"].prod(-1).tolist() if "image_grid" in processed else []
        return {"pixel_values": MultiModalFieldConfig.flat_from_sizes("image", num_patches),
                "image_grid": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_counts, processed, mm_kwargs) -> list[PromptUpdate]:
        grids = processed["image_grid"].tolist()
        return [PromptInsertion("image", PromptIndexTargets.start(),
                                lambda item: self.info.get_placeholder_ids(*grids[item]))]

    def apply(self, prompt, mm_items, mm_hashes, mm_kwargs=None) -> MultiModalInputs:
        has_image = bool(mm_items.get("image"))
        ids = self.info.token_ids
        tokenizer = self.info.get_tokenizer()
        if isinstance(prompt, str) and has_image:
            # tokenized with <0x04> as one text, as FuyuProcessor does (an empty text then still gets the
            # tokenizer's word-start piece in front of <0x04>)
            token_ids = list(tokenizer(prompt + BEGINNING_OF_ANSWER_TOKEN, add_special_tokens=False).input_ids)
        elif isinstance(prompt, str):
            token_ids = list(tokenizer(prompt).input_ids)
        else:
            token_ids = list(prompt) + ([ids[BEGINNING_OF_ANSWER_TOKEN]] if has_image else [])
        num_stray = token_ids.count(ids[IMAGE_TOKEN])
        if num_stray:
            raise ValueError(f"the prompt holds {num_stray} {IMAGE_TOKEN} image token(s) (id {ids[IMAGE_TOKEN]}) that "
                             f"no image fills; Fuyu puts the image in front of the prompt itself: leave "
                             f"{IMAGE_TOKEN} out of the prompt and give the image itself (at most one per prompt)")
        inputs = super().apply(token_ids, mm_items, mm_hashes, mm_kwargs)
        inputs.prompt = prompt if isinstance(prompt, str) else None
        return inputs
