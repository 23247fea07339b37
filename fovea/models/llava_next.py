"""LLaVA-NeXT (LLaVA-1.6, Liu et al. 2024): LLaVA-1.5 (llava.py) seeing an image as a base tile plus "anyres" tiles.

What LLaVA-NeXT adds over LLaVA-1.5 (tower, projector, LM and merge are LLaVA's):
- an image arrives as its base tile (the whole image at the tower's size) and the tiles of the best-fitting
  `image_grid_pinpoints` resolution (llava_next_processing.py, multimodal/processors/llava_next.py), all through
  the CLIP tower and the projector as one batch;
- the tiles' features are laid back out as one feature grid, the rows or columns that only saw the centred padding
  are cut off (`unpadded_window`), and the learned `image_newline` vector ends every row;
- an image's embeddings are the base tile's features, then that grid row by row: their number depends on the image's
  size, and the prompt holds exactly as many placeholders.
Only `vision_feature_select_strategy="default"` runs: with the class token kept a tile's features are no longer a
square grid (transformers' own LLaVA-NeXT cannot lay them out either).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fovea.models.llava import LlavaForConditionalGeneration
from fovea.models.llava_next_processing import (
    LlavaNextDummyInputsBuilder,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    unpadded_window,
)
from fovea.multimodal.processors.llava_next import check_pinpoints, select_best_resolution
from fovea.multimodal.registry import MULTIMODAL_REGISTRY


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=LlavaNextProcessingInfo, dummy_inputs=LlavaNextDummyInputsBuilder
)
class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config):
        if config.vision_feature_select_strategy != "default":
            raise ValueError(f"LLaVA-NeXT runs vision_feature_select_strategy 'default' only, not "
                             f"{config.vision_feature_select_strategy!r}: with the class token a tile's features do "
                             f"not form the square grid that anyres lays out")
        # transformers ties lm_head to the embeddings by the top-level flag (False unless set), whatever the text
        # config says (LlavaConfig copies the text config's up, LlavaNextConfig does not): the LM is built that way
        text_config = copy.copy(config.text_config)
        text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        config = copy.copy(config)
        config.text_config = text_config
        super().__init__(config)
        vision = config.vision_config
        self.tile_size, self.side = vision.image_size, vision.image_size // vision.patch_size
        self.pinpoints = check_pinpoints(config.image_grid_pinpoints, self.tile_size)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def rename_checkpoint_weight(self, name: str) -> str | None:
        return super().rename_checkpoint_weight("image_newline" if name == "model.image_newline" else name)

    def embed_multimodal(self, pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                         image_embeds: torch.Tensor | None = None,
                         num_image_tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One [num_image_tokens, hidden] tensor per image: from every image's tiles one after the other
        `pixel_values` [sum of tiles, 3, S, S] with `image_sizes` [num_images, 2] (height, width), or from
        pre-computed packed features `image_embeds` [sum of rows, hidden] split by `num_image_tokens` [num_images]."""
        if (pixel_values is None) == (image_embeds is None):
            if pixel_values is None:
                return []
            raise ValueError("give pixel_values or image_embeds, not both")
        if image_embeds is not None:
            hidden = self.config.text_config.hidden_size
            if image_embeds.dim() != 2 or image_embeds.shape[1] != hidden or num_image_tokens is None \
                    or int(num_image_tokens.sum()) != image_embeds.shape[0]:
                raise ValueError(f"image_embeds must be [sum of num_image_tokens, {hidden}], got "
                                 f"{list(image_embeds.shape)} for num_image_tokens {num_image_tokens}")
            embeds = image_embeds.to(self.multi_modal_projector.linear_2.params_dtype)
            return list(embeds.split(num_image_tokens.tolist()))
        sizes = [tuple(size) for size in image_sizes.tolist()]
        grids = [self._tile_grid(size) for size in sizes]
        num_tiles = [rows * cols + 1 for rows, cols in grids]
        if sum(num_tiles) != pixel_values.shape[0]:
            raise ValueError(f"images of sizes {sizes} have {sum(num_tiles)} tiles, pixel_values has "
                             f"{pixel_values.shape[0]}")
        features = self.multi_modal_projector(self.vision_tower(pixel_values))  # (tiles, side * side, hidden)
        return [self._pack(tiles, size, grid) for tiles, size, grid in zip(features.split(num_tiles), sizes, grids)]

    def _tile_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        height, width = select_best_resolution(image_size, self.pinpoints)
        return height // self.tile_size, width // self.tile_size

    def _pack(self, tiles: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """tiles [1 + rows * cols, side * side, D] -> the base tile's rows, then the unpadded feature grid with a
        newline after each of its rows: [side^2 + kept rows * (kept cols + 1), D]."""
        (tile_rows, tile_cols), side, dim = grid, self.side, tiles.shape[-1]
        base, grid_features = tiles[0], tiles[1:]
        # tiles in row-major order, each a side x side patch grid: (R, C, s, s, D) -> (R * s, C * s, D)
        grid_features = (grid_features.view(tile_rows, tile_cols, side, side, dim).permute(0, 2, 1, 3, 4)
                         .reshape(tile_rows * side, tile_cols * side, dim))
        top, rows, left, cols = unpadded_window(image_size, tile_rows * side, tile_cols * side)
        kept = grid_features[top:top + rows, left:left + cols]
        newlines = self.image_newline.to(kept.dtype).expand(rows, 1, dim)
        return torch.cat([base, torch.cat([kept, newlines], dim=1).reshape(-1, dim)])
