"""LLaVA-NeXT's multimodal processing: LLaVA-1.5's (llava_processing.py), with as many placeholders per image as its
anyres features have, which depends on the image's size.

Per image (transformers' `LlavaNextProcessor._get_number_of_features`, which the model's features always match):
the base tile's side x side features (side = tile / patch; the class token dropped, the only strategy LLaVA-NeXT
runs), plus the grid of the best-fitting pinpoint ((pinpoint height / tile) x side rows by (width / tile) x side
columns) cut back to the image's aspect ratio (`unpadded_window`), plus one `image_newline` per remaining row.
The image processor is `LlavaNextImageProcessor`: `pixel_values` [sum of tiles, 3, S, S] split per image by its
tile count, `image_sizes` [N, 2]. Pre-computed `image_embeds` are one image's packed features [num_image_tokens,
text hidden] each, any number of rows.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from fovea.models.llava_processing import LlavaDummyInputsBuilder, LlavaMultiModalProcessor, LlavaProcessingInfo
from fovea.multimodal.processing import (
    MultiModalFieldConfig,
    PromptReplacement,
    PromptUpdate,
    preprocess_images_or_embeds,
)
from fovea.multimodal.processors import LlavaNextImageProcessor, get_image_processor
from fovea.multimodal.processors.llava_next import check_pinpoints, select_best_resolution


def unpadded_window(image_size: tuple[int, int], grid_height: int, grid_width: int) -> tuple[int, int, int, int]:
    """(top, rows, left, cols) of a grid_height x grid_width feature grid that the image covers once the centred
    padding of a different aspect ratio is cut off (transformers' `unpad_image`, its float rounding kept)."""
    height, width = image_size
    if width / height > grid_width / grid_height:  # wider than the grid: rows of padding above and below
        pad = (grid_height - int(round(height * (grid_width / width), 7))) // 2
        return pad, grid_height - 2 * pad, 0, grid_width
    pad = (grid_width - int(round(width * (grid_height / height), 7))) // 2
    return 0, grid_height, pad, grid_width - 2 * pad


class LlavaNextProcessingInfo(LlavaProcessingInfo):
    @functools.cached_property
    def pinpoints(self) -> tuple[tuple[int, int], ...]:
        return check_pinpoints(self.get_hf_config().image_grid_pinpoints, self.get_hf_config().vision_config.image_size)

    def tile_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles an image of `image_size` (height, width) is cut into, the base tile not counted."""
        tile = self.get_hf_config().vision_config.image_size
        height, width = select_best_resolution(image_size, self.pinpoints)
        return height // tile, width // tile

    def get_num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Placeholders of an image of `image_size` (height, width): the base tile, the unpadded grid, a newline a
        row. Without a size, the most any image takes (`get_image_size_with_most_features`)."""
        if image_size is None:
            image_size = self.get_image_size_with_most_features()
        vision = self.get_hf_config().vision_config
        side = vision.image_size // vision.patch_size
        tile_rows, tile_cols = self.tile_grid(image_size)
        _, rows, _, cols = unpadded_window(image_size, tile_rows * side, tile_cols * side)
        return side * side + rows * cols + rows

    def get_image_size_with_most_features(self) -> tuple[int, int]:
        """(height, width): an image exactly a pinpoint's size is tiled at it and needs no unpadding, so the
        largest pinpoint grid (newlines included) is the worst case; the first such pinpoint."""
        return max(self.pinpoints, key=lambda size: (self.get_num_image_tokens(size), -self.pinpoints.index(size)))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}

    @functools.cached_property
    def image_processor(self) -> LlavaNextImageProcessor:
        processor = get_image_processor(self.ctx.model_dir)
        if not isinstance(processor, LlavaNextImageProcessor):
            raise ValueError(f"LLaVA-NeXT takes LLaVA-NeXT's image processor; this checkpoint names "
                             f"{type(processor).__name__}")
        size = self.get_hf_config().vision_config.image_size
        if processor.output_size() != (size, size):
            raise ValueError(f"the image processor makes {processor.output_size()} tiles but the vision tower "
                             f"takes {size} x {size}")
        if processor.image_grid_pinpoints != self.pinpoints:
            theirs, ours = [list(p) for p in processor.image_grid_pinpoints], [list(p) for p in self.pinpoints]
            raise ValueError(f"the image processor's image_grid_pinpoints {theirs} differ from the model config's "
                             f"{ours}; the placeholders would not match the features (make them equal)")
        return processor

    def get_embed_shape(self) -> tuple[int | None, int]:
        return None, self.get_hf_config().text_config.hidden_size


class LlavaNextDummyInputsBuilder(LlavaDummyInputsBuilder):
    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int]) -> dict[str, list[Any]]:
        height, width = self.info.get_image_size_with_most_features()
        return {"image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0))}


class LlavaNextMultiModalProcessor(LlavaMultiModalProcessor):
    info: LlavaNextProcessingInfo

    def _preprocess(self, mm_items: Mapping[str, list[Any]], mm_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return preprocess_images_or_embeds(mm_items.get("image", []), self.info.image_processor, model="LLaVA-NeXT",
                                           embed_shape=self.info.get_embed_shape(),
                                           embed_dims="image tokens (any number), text hidden size")

    def _get_mm_fields_config(self, processed, mm_kwargs) -> dict[str, MultiModalFieldConfig]:
        if "image_embeds" in processed:
            rows = processed["num_image_tokens"].tolist()
            return {"image_embeds": MultiModalFieldConfig.flat_from_sizes("image", rows),
                    "num_image_tokens": MultiModalFieldConfig.batched("image")}
        if "image_sizes" not in processed:  # a text-only prompt
            return {}
        tiles = [self.info.image_processor.num_tiles(tuple(size)) for size in processed["image_sizes"].tolist()]
        return {"pixel_values": MultiModalFieldConfig.flat_from_sizes("image", tiles),
                "image_sizes": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_counts, processed, mm_kwargs) -> list[PromptUpdate]:
        token_id = self.info.get_image_token_id()
        if "image_embeds" in processed:
            counts = processed["num_image_tokens"].tolist()
        else:
            counts = [self.info.get_num_image_tokens(tuple(size)) for size in processed["image_sizes"].tolist()]
        return [PromptReplacement("image", [token_id], lambda item: [token_id] * counts[item])]

    def _expansion(self) -> str:
        return "one placeholder per feature, as many as the image's size gives"
