"""BLIP's image processor (BLIP, BLIP-2, InstructBLIP): one resize to a fixed size, then rescale and normalise."""
from __future__ import annotations

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
    parse_resample,
    per_channel,
    apply_value_table,
    pil_value_table,
)

# BlipImageProcessor's options, as its __init__ takes them.
_INIT_OPTIONS = frozenset({"size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                           "image_mean", "image_std", "do_convert_rgb"})
# Steps fovea does not implement: harmless while switched off, an error when on. switch -> its companion.
_UNIMPLEMENTED_STEPS = {"do_center_crop": "crop_size", "do_pad": "pad_size"}


class BlipImageProcessor:
    """transformers' `BlipImageProcessorPil` (also used by BLIP-2 and InstructBLIP).

    Per image: to RGB (transparency composited onto white) -> one Pillow resize to `size` -> uint8 ->
    rescale in float64, rounded to float32 -> normalise in float32. The result depends only on the uint8
    value and the channel, so the last two steps are a per-channel 256-entry table built with transformers'
    exact arithmetic, and applying it is a gather: bit-identical and about 8x faster than the arithmetic.

    None is read as transformers reads it from a config: a switch that is None is off, and a value that
    is None is an error only if a step that is on needs it.
    """

    def __init__(
        self,
        *,
        size: dict[str, int] | int | tuple[int, int] | list[int] | None = (384, 384),  # (height, width)
        resample: int | Image.Resampling | None = Image.Resampling.BICUBIC,
        do_resize: bool | None = True,
        do_rescale: bool | None = True,
        rescale_factor: float | None = 1 / 255,
        do_normalize: bool | None = True,
        image_mean: float | tuple[float, ...] | list[float] | None = OPENAI_CLIP_MEAN,
        image_std: float | tuple[float, ...] | list[float] | None = OPENAI_CLIP_STD,
        do_convert_rgb: bool | None = True,
    ) -> None:
        self.do_resize = bool(do_resize)
        self.do_rescale = bool(do_rescale)
        self.do_normalize = bool(do_normalize)
        self.do_convert_rgb = bool(do_convert_rgb)
        needed = {"size": self.do_resize, "resample": self.do_resize, "rescale_factor": self.do_rescale,
                  "image_mean": self.do_normalize, "image_std": self.do_normalize}
        given = {"size": size, "resample": resample, "rescale_factor": rescale_factor, "image_mean": image_mean,
                 "image_std": image_std}
        missing = [name for name, is_needed in needed.items() if is_needed and given[name] is None]
        if missing:
            raise ValueError(f"{missing} must be set when the step that uses them is on "
                             f"(do_resize={self.do_resize}, do_rescale={self.do_rescale}, "
                             f"do_normalize={self.do_normalize})")
        self.size = None if size is None else _parse_size(size)  # {"height": h, "width": w}
        self.resample = None if resample is None else parse_resample(resample)
        self.rescale_factor = None if rescale_factor is None else float(rescale_factor)
        self.image_mean = None if image_mean is None else per_channel("image_mean", image_mean)
        self.image_std = None if image_std is None else per_channel("image_std", image_std)
        if self.do_normalize and 0.0 in self.image_std:
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self._value_table = self._build_value_table()  # (3, 256) float32: channel, uint8 value -> output

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> BlipImageProcessor:
        return cls.from_dict(read_image_processor_config(model_dir))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BlipImageProcessor:
        """Build from a transformers image processor config (the dict `to_dict` or a config file holds)."""
        options = {k: v for k, v in config.items() if k not in METADATA_KEYS and k not in NO_EFFECT_KEYS}
        for switch, companion in _UNIMPLEMENTED_STEPS.items():
            if options.pop(switch, None):
                raise ValueError(f"{switch}=true is not supported by fovea's {cls.__name__} (it would change the "
                                 f"pixel values and is not implemented)")
            options.pop(companion, None)  # unused while its step is off
        # transformers reads an int size as a square only when default_to_square (BLIP's default) is truthy
        default_to_square = options.pop("default_to_square", True)
        if isinstance(options.get("size"), int) and not default_to_square:
            raise ValueError(f"size={options['size']} with default_to_square=false means a shortest-edge resize, "
                             f"which fovea's {cls.__name__} does not implement")
        unknown = sorted(set(options) - _INIT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(_INIT_OPTIONS)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Every option in canonical form (JSON-able; what `from_dict` reads and what content hashes key on)."""
        return {
            "image_processor_type": type(self).__name__,
            "size": self.size,
            "resample": None if self.resample is None else int(self.resample),
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": None if self.image_mean is None else list(self.image_mean),
            "image_std": None if self.image_std is None else list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """-> {"pixel_values": float32 (num_images, 3, height, width)}."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to process")
        pixels = [self._resized_rgb(image) for image in images]  # each (H, W, 3) uint8
        return {"pixel_values": apply_value_table(pixels, self._value_table, "and do_resize is off")}

    def _resized_rgb(self, image: Image.Image) -> np.ndarray:
        if self.do_convert_rgb:
            image = convert_to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image has mode {image.mode!r} and do_convert_rgb is off; the model needs RGB")
        if self.do_resize:
            image = image.resize((self.size["width"], self.size["height"]), resample=self.resample)
        return np.asarray(image)

    def _build_value_table(self) -> np.ndarray:
        return pil_value_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                               self.image_std)



def _parse_size(size: dict[str, int] | int | tuple[int, int] | list[int]) -> dict[str, int]:
    """An int is a square and a pair is (height, width), as transformers reads them."""
    if isinstance(size, dict):
        if set(size) != {"height", "width"}:
            raise ValueError(f"size must have exactly the keys 'height' and 'width' (other resize modes are not "
                             f"implemented for BLIP); got {size}")
        height, width = size["height"], size["width"]
    elif isinstance(size, int) and not isinstance(size, bool):
        height = width = size
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        height, width = size
    else:
        raise ValueError(f"size must be {{'height': h, 'width': w}}, an int or a (height, width) pair; got {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise ValueError(f"size height and width must be positive ints; got {size!r}")
    return {"height": height, "width": width}
