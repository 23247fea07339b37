"""What Qwen2-VL's image and video processors share: `smart_resize` and the options both read."""
from __future__ import annotations

import math
from typing import Any

from PIL import Image

from fovea.multimodal.processors.transforms import (
    METADATA_KEYS,
    NO_EFFECT_KEYS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    parse_resample,
    per_channel,
)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect
    ratio kept as well as that allows. transformers' arithmetic exactly (Python's round-half-to-even included).

    The upper bound is not strict: `max(factor, ...)` keeps a very thin side at one factor, so an aspect ratio
    near the limit of 200 can exceed max_pixels.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width} (height x width)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


_QWEN_OPTIONS = frozenset({"min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "resample",
                           "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                           "do_convert_rgb"})


class QwenVisionProcessor:
    """Options shared by Qwen2-VL's image and video processors, read as transformers reads them.

    `size={"shortest_edge": min_pixels, "longest_edge": max_pixels}` (transformers 5) or top-level
    `min_pixels`/`max_pixels` (older checkpoints; these win, as in transformers' __init__).
    """

    DEFAULT_MIN_PIXELS = 56 * 56
    DEFAULT_MAX_PIXELS = 28 * 28 * 1280
    extra_options: frozenset[str] = frozenset()
    no_effect_options: frozenset[str] = NO_EFFECT_KEYS | {"default_to_square"}

    def __init__(self, *, min_pixels: int | None = None, max_pixels: int | None = None, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2,
                 resample: int | Image.Resampling = Image.Resampling.BICUBIC, do_resize: bool = True,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | tuple[float, ...] | list[float] = OPENAI_CLIP_MEAN,
                 image_std: float | tuple[float, ...] | list[float] = OPENAI_CLIP_STD, do_convert_rgb: bool = True):
        self.min_pixels = self.DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels
        self.max_pixels = self.DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        sizes = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": patch_size,
                 "temporal_patch_size": temporal_patch_size, "merge_size": merge_size}
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is larger than max_pixels {self.max_pixels}")
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.resample = parse_resample(resample)
        self.do_resize, self.do_rescale = bool(do_resize), bool(do_rescale)
        self.do_normalize, self.do_convert_rgb = bool(do_normalize), bool(do_convert_rgb)
        self.rescale_factor = float(rescale_factor)
        self.image_mean = per_channel("image_mean", image_mean)
        self.image_std = per_channel("image_std", image_std)
        if self.do_normalize and 0.0 in self.image_std:
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    @property
    def factor(self) -> int:
        """Side length of one LLM token in pixels (a merged group of patches)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        options = {k: v for k, v in config.items()
                   if k not in METADATA_KEYS and k not in cls.no_effect_options and k != "video_processor_type"}
        size = options.pop("size", None)
        if size is not None:
            if not isinstance(size, dict) or not set(size) <= {"shortest_edge", "longest_edge", "min_pixels",
                                                                 "max_pixels"}:
                raise ValueError(f"size must be {{'shortest_edge': min_pixels, 'longest_edge': max_pixels}}, "
                                 f"got {size!r}")
            options.setdefault("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
            options.setdefault("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        unknown = sorted(set(options) - _QWEN_OPTIONS - cls.extra_options)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; valid options: "
                             f"{sorted(_QWEN_OPTIONS | cls.extra_options | {'size'})}")
        return cls(**{k: v for k, v in options.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Every option in canonical form (JSON-able; what `from_dict` reads and what content hashes key on)."""
        return {"image_processor_type": type(self).__name__, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "patch_size": self.patch_size,
                "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
                "resample": int(self.resample), "do_resize": self.do_resize, "do_rescale": self.do_rescale,
                "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "do_convert_rgb": self.do_convert_rgb}

    def with_options(self, **overrides: Any):
        """A copy with some options replaced (e.g. per-request min_pixels / max_pixels)."""
        return type(self).from_dict({**self.to_dict(), **overrides}) if overrides else self

    def resized_size(self, height: int, width: int, max_pixels: int | None = None) -> tuple[int, int]:
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ValueError(f"with do_resize off, sides must be multiples of {self.factor}; got {height}x{width}")
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels,
                            self.max_pixels if max_pixels is None else max_pixels)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(grid_h, grid_w) in patches of an input of height x width pixels."""
        h, w = self.resized_size(height, width)
        return h // self.patch_size, w // self.patch_size
