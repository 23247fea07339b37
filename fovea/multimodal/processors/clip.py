"""CLIP's image processor (CLIP, LLaVA-1.5): resize the shortest edge, centre crop, rescale and normalise."""
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
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    convert_to_rgb,
    parse_pixel_value_steps,
    apply_value_table,
)

_INIT_OPTIONS = frozenset({"size", "crop_size", "resample", "do_resize", "do_center_crop", "do_rescale",
                           "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb"})


class CLIPImageProcessor:
    """transformers' `CLIPImageProcessorPil`, step for step.

    Per image: to RGB (transparency composited onto white) -> Pillow resize so the shortest edge is
    `size["shortest_edge"]` (the other edge `int(shortest * long / short)`, truncated as transformers does), or
    to a fixed `{"height", "width"}` -> centre crop to `crop_size` (offsets rounded down; an image smaller
    than the crop is first padded with zeros, centred, rounding the padding up) -> uint8 -> the rescale +
    normalise table of `pil_value_table` (bit-equal to transformers' float arithmetic).
    """

    def __init__(
        self,
        *,
        size: dict[str, int] | int | None = None,
        crop_size: dict[str, int] | int | None = None,
        resample: int | Image.Resampling | None = Image.Resampling.BICUBIC,
        do_resize: bool | None = True,
        do_center_crop: bool | None = True,
        do_rescale: bool | None = True,
        rescale_factor: float | None = 1 / 255,
        do_normalize: bool | None = True,
        image_mean: float | tuple[float, ...] | list[float] | None = OPENAI_CLIP_MEAN,
        image_std: float | tuple[float, ...] | list[float] | None = OPENAI_CLIP_STD,
        do_convert_rgb: bool | None = True,
    ) -> None:
        self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
        self.do_rescale, self.do_normalize, self.do_convert_rgb = bool(do_rescale), bool(do_normalize), bool(do_convert_rgb)
        # transformers' class defaults: shortest edge 224, crop 224 x 224
        self.size = _parse_size(size if size is not None else {"shortest_edge": 224}, "size", int_is="shortest_edge")
        self.crop_size = _parse_size(crop_size if crop_size is not None else {"height": 224, "width": 224},
                                     "crop_size", int_is="square")
        if "shortest_edge" in self.crop_size:
            raise ValueError(f"crop_size must be {{'height': h, 'width': w}}, got {crop_size!r}")
        self.resample, self.rescale_factor, self.image_mean, self.image_std, self._value_table = \
            parse_pixel_value_steps(self.do_resize, resample, self.do_rescale, rescale_factor, self.do_normalize,
                                    image_mean, image_std)  # the table: (3, 256) float32

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> CLIPImageProcessor:
        return cls.from_dict(read_image_processor_config(model_dir))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPImageProcessor:
        options = {k: v for k, v in config.items() if k not in METADATA_KEYS and k not in NO_EFFECT_KEYS}
        if options.pop("default_to_square", False) and isinstance(options.get("size"), int):
            options["size"] = {"height": options["size"], "width": options["size"]}
        if options.pop("do_pad", None):
            raise ValueError(f"do_pad=true is not supported by fovea's {cls.__name__} (it would change the pixel "
                             f"values and is not implemented)")
        options.pop("pad_size", None)
        unknown = sorted(set(options) - _INIT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(_INIT_OPTIONS)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Every option in canonical form (JSON-able; what `from_dict` reads and what content hashes key on)."""
        return {
            "image_processor_type": type(self).__name__, "size": self.size, "crop_size": self.crop_size,
            "resample": None if self.resample is None else int(self.resample), "do_resize": self.do_resize,
            "do_center_crop": self.do_center_crop, "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
            "image_mean": None if self.image_mean is None else list(self.image_mean),
            "image_std": None if self.image_std is None else list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, when the options fix it (a centre crop does)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """-> {"pixel_values": float32 (num_images, 3, height, width)}."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to process")
        pixels = [self._cropped_rgb(image) for image in images]  # each (H, W, 3) uint8
        return {"pixel_values": apply_value_table(pixels, self._value_table, "after processing (do_center_crop is off)")}

    def _cropped_rgb(self, image: Image.Image) -> np.ndarray:
        if self.do_convert_rgb:
            image = convert_to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image has mode {image.mode!r} and do_convert_rgb is off; the model needs RGB")
        if self.do_resize:
            height, width = self._resized_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        array = np.asarray(image)
        return center_crop(array, self.crop_size["height"], self.crop_size["width"]) if self.do_center_crop else array

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(array: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """array (H, W, C) -> (crop_height, crop_width, C), as transformers' `center_crop`: offsets rounded down,
    and an image smaller than the crop padded with zeros first (the padding before it rounded up)."""
    height, width = array.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return array[top:top + crop_height, left:left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    padded = np.zeros((new_height, new_width) + array.shape[2:], dtype=array.dtype)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = array
    top, left = max(0, top + top_pad), max(0, left + left_pad)
    return padded[top:top + crop_height, left:left + crop_width]


def _parse_size(size: dict[str, int] | int, name: str, int_is: str) -> dict[str, int]:
    """{"shortest_edge": n} or {"height": h, "width": w}; an int is a shortest edge (`size`, as CLIP's
    default_to_square=False reads it) or a square (`crop_size`)."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"shortest_edge": size} if int_is == "shortest_edge" else {"height": size, "width": size}
    if not isinstance(size, dict) or set(size) not in ({"shortest_edge"}, {"height", "width"}):
        raise ValueError(f"{name} must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values()):
        raise ValueError(f"{name} values must be positive ints, got {size!r}")
    return dict(size)
