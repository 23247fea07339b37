"""LLaVA-NeXT's "anyres" image processor: the base image plus the tiles of the best-fitting grid resolution.

What it adds over CLIP's (clip.py), each step as transformers' `LlavaNextImageProcessorPil` takes it:
- `select_best_resolution`: of the `image_grid_pinpoints` (height, width), the one that keeps the most of the
  image's pixels once it is scaled to fit, ties going to the one that wastes the least area;
- the image resized to fit that resolution keeping its aspect ratio (`fit_size`: the long side exactly, the
  other rounded up), centred on black (the smaller padding before), and cut into `crop_size` tiles, row by row;
- the base image: the whole image resized to `size` (a square of the shortest edge), ahead of the tiles;
- each of those goes through CLIP's own steps (resize, centre crop, rescale + normalise).

`pixel_values` holds every image's tiles one after the other ([sum of tiles, 3, S, S]; `image_sizes` [N, 2] says
how many each has), where transformers pads every image to the most tiles of the batch (`do_pad`, a batching
detail that does not change any value, so it is accepted and has no effect here).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from fovea.multimodal.processors.clip import CLIPImageProcessor
from fovea.multimodal.processors.transforms import apply_value_table, convert_to_rgb

# transformers' default (llava-hf's LLaVA-1.6 checkpoints spell it out in their configs)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(height, width) of the pinpoint an image of `image_size` (height, width) is tiled at: the most effective
    pixels (the image's, once scaled to fit, never more than it has), then the least wasted area; the first
    pinpoint wins a full tie. transformers' `select_best_resolution`, the float arithmetic kept."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_height, pin_width), effective, wasted
    return best


def fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) an image takes inside `target` keeping its aspect ratio: the side that limits the scale
    fills the target, the other is rounded up (transformers' `get_patch_output_size`)."""
    height, width = image_size
    target_height, target_width = target
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


def check_pinpoints(pinpoints: Any, tile_size: int) -> tuple[tuple[int, int], ...]:
    """`image_grid_pinpoints` as (height, width) pairs, each a whole number of `tile_size` tiles."""
    if isinstance(pinpoints, (list, tuple)) and pinpoints:
        pairs = []
        for pair in pinpoints:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
                break
            pairs.append((pair[0], pair[1]))
        else:
            bad = [list(p) for p in pairs if p[0] % tile_size or p[1] % tile_size]
            if bad:
                raise ValueError(f"image_grid_pinpoints {bad} are not whole numbers of {tile_size}-pixel tiles "
                                 f"(the crop size); every pinpoint must be a multiple of it in both sides")
            return tuple(pairs)
    raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs of positive ints, "
                     f"got {pinpoints!r}")


class LlavaNextImageProcessor(CLIPImageProcessor):
    """transformers' `LlavaNextImageProcessorPil`, step for step (see the module docstring)."""

    def __init__(self, *, image_grid_pinpoints: Sequence[Sequence[int]] = DEFAULT_PINPOINTS, **options: Any) -> None:
        super().__init__(**options)
        self.tile_size = self.crop_size["height"]  # transformers cuts square tiles of the crop height
        self.image_grid_pinpoints = check_pinpoints(image_grid_pinpoints, self.tile_size)
        edge = self.size.get("shortest_edge")
        self.base_size = (edge, edge) if edge is not None else (self.size["height"], self.size["width"])

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlavaNextImageProcessor:
        options = dict(config)
        options.pop("do_pad", None)  # pads the batch's tile counts: no value changes (module docstring)
        # llava-hf's LLaVA-1.6 configs say "anyres" here; transformers reads no such option and always tiles
        options.pop("aspect_ratio_setting", None)
        pinpoints = options.pop("image_grid_pinpoints", DEFAULT_PINPOINTS)
        clip_options = CLIPImageProcessor.from_dict(options).to_dict()  # checked and canonical
        clip_options.pop("image_processor_type")
        return cls(image_grid_pinpoints=pinpoints, **clip_options)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints]}

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """Tiles of an image of `image_size` (height, width), the base image included."""
        height, width = select_best_resolution(image_size, self.image_grid_pinpoints)
        return (height // self.tile_size) * (width // self.tile_size) + 1

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """-> {"pixel_values": float32 [sum of tiles, 3, S, S], "image_sizes": int64 [num_images, 2] (height,
        width of each image as given)}."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to process")
        pixels, sizes = [], []
        for image in images:
            if self.do_convert_rgb:
                image = convert_to_rgb(image)
            pixels += [self._cropped_rgb(tile) for tile in self.tiles(image)]  # each (S, S, 3) uint8
            sizes.append((image.height, image.width))
        pixel_values = apply_value_table(pixels, self._value_table, "after processing (do_center_crop is off)")
        return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.int64)}

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The base image, then the tiles of the best-fitting resolution, left to right and top to bottom."""
        resample = self.resample if self.resample is not None else Image.Resampling.BILINEAR
        best = select_best_resolution((image.height, image.width), self.image_grid_pinpoints)
        height, width = fit_size((image.height, image.width), best)
        canvas = Image.new("RGB", (best[1], best[0]))  # black: transformers pads the uint8 image with zeros
        canvas.paste(image.resize((width, height), resample=resample),
                     ((best[1] - width) // 2, (best[0] - height) // 2))
        step = self.tile_size
        tiles = [canvas.crop((left, top, left + step, top + step))
                 for top in range(0, best[0], step) for left in range(0, best[1], step)]
        base = image.resize((self.base_size[1], self.base_size[0]), resample=resample)
        return [base] + tiles

