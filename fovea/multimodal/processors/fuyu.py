"""Fuyu's image processor: no fixed size and no vision tower, the image is cut into patches the LM takes as tokens."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from fovea.multimodal.processors.configs import read_image_processor_config
from fovea.multimodal.processors.transforms import (
    METADATA_KEYS,
    NO_EFFECT_KEYS,
    convert_to_rgb,
    parse_pixel_value_steps,
)

_INIT_OPTIONS = frozenset({"size", "patch_size", "resample", "do_resize", "do_pad", "padding_value", "padding_mode",
                           "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                           "do_convert_rgb"})


class FuyuImageProcessor:
    """transformers' `FuyuImageProcessorPil` followed by the patch cutting of `FuyuProcessor`, step for step.

    Per image: to RGB (transparency composited onto white; transformers' Fuyu leaves the mode as it is, which
    only works for RGB) -> an image larger than `size` in either edge is shrunk with Pillow to fit, keeping its
    aspect ratio (each edge `int(edge * scale)`); smaller ones keep their size -> the bottom and right edges
    are padded with `padding_value` up to whole patches (transformers pads to `size` and then cuts the image
    back to the whole patches it covers, which leaves the same pixels) -> rescale and normalise as one uint8
    table (`pil_value_table`; the padding is applied to the uint8 values, so it is normalised too) -> patches
    of `patch_size`, row-major over the grid, each flattened as (patch row, patch column, channel).

    `__call__` returns `pixel_values` [sum of patches, patch_h * patch_w * 3] float32 for all images and
    `image_grid` [num_images, 2] (rows, columns of patches) to split them per image.
    """

    def __init__(
        self,
        *,
        size: dict[str, int] | None = None,
        patch_size: dict[str, int] | None = None,
        resample: int | Image.Resampling | None = Image.Resampling.BILINEAR,
        do_resize: bool | None = True,
        do_pad: bool | None = True,
        padding_value: float = 1.0,
        padding_mode: str = "constant",
        do_rescale: bool | None = True,
        rescale_factor: float | None = 1 / 255,
        do_normalize: bool | None = True,
        image_mean: float | tuple[float, ...] | list[float] | None = 0.5,
        image_std: float | tuple[float, ...] | list[float] | None = 0.5,
        do_convert_rgb: bool | None = True,
    ) -> None:
        # transformers' class defaults: at most 1080 x 1920, patches of 30 x 30
        self.size = _height_width(size if size is not None else {"height": 1080, "width": 1920}, "size")
        self.patch_size = _height_width(patch_size if patch_size is not None else {"height": 30, "width": 30},
                                        "patch_size")
        (height, width), (patch_h, patch_w) = self.size, self.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(f"size {height} x {width} must be whole patches of {patch_h} x {patch_w} (transformers "
                             f"fails on images that reach a partial patch at the edge)")
        if not do_pad:
            raise ValueError("do_pad=false is not supported: Fuyu's patches need images padded to whole patches")
        if padding_mode != "constant":
            raise ValueError(f"padding_mode {padding_mode!r} is not supported by fovea; it pads with 'constant'")
        if not (isinstance(padding_value, (int, float)) and float(padding_value).is_integer()
                and 0 <= padding_value <= 255):
            raise ValueError(f"padding_value must be a whole number 0..255 (it pads the uint8 image), got "
                             f"{padding_value!r}")
        self.padding_value = int(padding_value)
        self.do_resize, self.do_convert_rgb = bool(do_resize), bool(do_convert_rgb)
        self.do_rescale, self.do_normalize = bool(do_rescale), bool(do_normalize)
        self.resample, self.rescale_factor, self.image_mean, self.image_std, self._value_table = \
            parse_pixel_value_steps(self.do_resize, resample, self.do_rescale, rescale_factor, self.do_normalize,
                                    image_mean, image_std)  # the table: (3, 256) float32

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> FuyuImageProcessor:
        return cls.from_dict(read_image_processor_config(model_dir))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> FuyuImageProcessor:
        options = {k: v for k, v in config.items() if k not in METADATA_KEYS and k not in NO_EFFECT_KEYS}
        unknown = sorted(set(options) - _INIT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(_INIT_OPTIONS)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Every option in canonical form (JSON-able; what `from_dict` reads and what content hashes key on)."""
        return {
            "image_processor_type": type(self).__name__,
            "size": {"height": self.size[0], "width": self.size[1]},
            "patch_size": {"height": self.patch_size[0], "width": self.patch_size[1]},
            "resample": None if self.resample is None else int(self.resample), "do_resize": self.do_resize,
            "do_pad": True, "padding_value": self.padding_value, "padding_mode": "constant",
            "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
            "image_mean": None if self.image_mean is None else list(self.image_mean),
            "image_std": None if self.image_std is None else list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: shrunk to fit `size` (each edge truncated), or as it is."""
        max_height, max_width = self.size
        if not self.do_resize or (height <= max_height and width <= max_width):
            return height, width
        scale = min(max_height / height, max_width / width)
        new_height, new_width = int(height * scale), int(width * scale)
        if new_height == 0 or new_width == 0:
            raise ValueError(f"an image of {height} x {width} pixels shrunk to fit {max_height} x {max_width} would "
                             f"be {new_height} x {new_width}; its aspect ratio is too extreme")
        return new_height, new_width

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patches for an image of `height` x `width` pixels."""
        new_height, new_width = self.resized_size(height, width)
        if new_height > self.size[0] or new_width > self.size[1]:
            # transformers pads to `size`, which fails for a larger image (do_resize off)
            raise ValueError(f"an image of {height} x {width} pixels is larger than size {self.size[0]} x "
                             f"{self.size[1]} and do_resize is off")
        return math.ceil(new_height / self.patch_size[0]), math.ceil(new_width / self.patch_size[1])

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to process")
        patches, grids = [], []
        for image in images:
            image_patches, grid = self._patches(image)
            patches.append(image_patches)
            grids.append(grid)
        return {"pixel_values": torch.from_numpy(np.concatenate(patches)), "image_grid": torch.tensor(grids)}

    def _patches(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        if self.do_convert_rgb:
            image = convert_to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image has mode {image.mode!r} and do_convert_rgb is off; the model needs RGB")
        rows, cols = self.grid_size(image.height, image.width)
        height, width = self.resized_size(image.height, image.width)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=self.resample)
        patch_h, patch_w = self.patch_size
        padded = np.full((rows * patch_h, cols * patch_w, 3), self.padding_value, dtype=np.uint8)
        padded[:height, :width] = np.asarray(image)
        values = np.empty(padded.shape, dtype=np.float32)
        for channel in range(3):
            np.take(self._value_table[channel], padded[..., channel], out=values[..., channel])
        # (rows, patch_h, cols, patch_w, 3) -> (rows, cols, patch_h, patch_w, 3): one flattened patch per row
        grid = values.reshape(rows, patch_h, cols, patch_w, 3).transpose(0, 2, 1, 3, 4)
        return grid.reshape(rows * cols, patch_h * patch_w * 3), (rows, cols)


def _height_width(value: Any, name: str) -> tuple[int, int]:
    if not isinstance(value, dict) or set(value) != {"height", "width"}:
        raise ValueError(f"{name} must be {{'height': h, 'width': w}}, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise ValueError(f"{name} values must be positive ints, got {value!r}")
    return value["height"], value["width"]
