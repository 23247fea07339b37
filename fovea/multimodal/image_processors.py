"""Image processors: decoded PIL images in, the vision encoder's `pixel_values` out.

Each class reproduces one transformers image processor bit for bit (tests/multimodal checks against the
oracle) with PIL and numpy only; fovea never needs torchvision. transformers without torchvision picks the
PIL backend (`BlipImageProcessorPil`), which is the one matched here: torchvision's tensor resize rounds
differently, so the two transformers backends do not agree with each other.

Config files, as transformers reads them: `processor_config.json` with the options nested under
"image_processor" (what transformers 5 writes for a multimodal processor) wins; otherwise a flat
`preprocessor_config.json` (older checkpoints, or an image processor saved alone).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BlipImageProcessor's options, as its __init__ takes them.
_INIT_OPTIONS = frozenset({"size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                           "image_mean", "image_std", "do_convert_rgb"})
# Keys in a processor config that say what to build, not how to process.
_METADATA_KEYS = frozenset({"image_processor_type", "processor_class", "_processor_class", "feature_extractor_type",
                            "auto_map"})
# transformers `ImagesKwargs` that never change the pixel values this PIL pipeline computes: output container,
# device, batching strategy, input layout of arrays (we take PIL images), and a processor-level token count.
_NO_EFFECT_KEYS = frozenset({"return_tensors", "data_format", "input_data_format", "device", "disable_grouping",
                             "image_seq_length"})
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
        self.resample = None if resample is None else _parse_resample(resample)
        self.rescale_factor = None if rescale_factor is None else float(rescale_factor)
        self.image_mean = None if image_mean is None else _per_channel("image_mean", image_mean)
        self.image_std = None if image_std is None else _per_channel("image_std", image_std)
        if self.do_normalize and 0.0 in self.image_std:
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self._value_table = self._build_value_table()  # (3, 256) float32: channel, uint8 value -> output

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> BlipImageProcessor:
        return cls.from_dict(read_image_processor_config(model_dir))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BlipImageProcessor:
        """Build from a transformers image processor config (the dict `to_dict` or a config file holds)."""
        options = {k: v for k, v in config.items() if k not in _METADATA_KEYS and k not in _NO_EFFECT_KEYS}
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
        if len({p.shape for p in pixels}) > 1:
            raise ValueError(f"images differ in size and do_resize is off, so they cannot form one batch: "
                             f"{[p.shape[:2] for p in pixels]}")
        batch = np.stack(pixels)  # (N, H, W, 3) uint8
        num_images, height, width, _ = batch.shape
        pixel_values = np.empty((num_images, 3, height, width), dtype=np.float32)
        for channel in range(3):
            np.take(self._value_table[channel], batch[..., channel], out=pixel_values[:, channel], mode="clip")
        return {"pixel_values": torch.from_numpy(pixel_values)}

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


def pil_value_table(do_rescale: bool, rescale_factor: float | None, do_normalize: bool,
                    image_mean: tuple[float, ...] | None, image_std: tuple[float, ...] | None) -> np.ndarray:
    """(3, 256) float32: what transformers' PIL backend makes of uint8 value v in channel c.

    transformers' arithmetic, step for step: rescale multiplies in float64 and rounds to float32;
    normalize works in float32 with mean and std rounded to float32.
    """
    values = np.arange(256, dtype=np.uint8)
    if do_rescale:
        values = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        values = values.astype(np.float32)  # normalize's own cast of integer pixels (and the output dtype)
    table = np.broadcast_to(values, (3, 256))
    if do_normalize:
        mean = np.asarray(image_mean, dtype=np.float32)[:, None]
        std = np.asarray(image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return np.ascontiguousarray(table, dtype=np.float32)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' rule: any alpha band or `transparency` entry (P, or RGB/L with a tRNS colour) means
    composite onto opaque white; everything else is a plain Pillow `convert("RGB")`."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------------------- Qwen2-VL


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


class _QwenVisionProcessor:
    """Options shared by Qwen2-VL's image and video processors, read as transformers reads them.

    `size={"shortest_edge": min_pixels, "longest_edge": max_pixels}` (transformers 5) or top-level
    `min_pixels`/`max_pixels` (older checkpoints; these win, as in transformers' __init__).
    """

    DEFAULT_MIN_PIXELS = 56 * 56
    DEFAULT_MAX_PIXELS = 28 * 28 * 1280
    extra_options: frozenset[str] = frozenset()
    no_effect_options: frozenset[str] = _NO_EFFECT_KEYS | {"default_to_square"}

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
        self.resample = _parse_resample(resample)
        self.do_resize, self.do_rescale = bool(do_resize), bool(do_rescale)
        self.do_normalize, self.do_convert_rgb = bool(do_normalize), bool(do_convert_rgb)
        self.rescale_factor = float(rescale_factor)
        self.image_mean = _per_channel("image_mean", image_mean)
        self.image_std = _per_channel("image_std", image_std)
        if self.do_normalize and 0.0 in self.image_std:
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    @property
    def factor(self) -> int:
        """Side length of one LLM token in pixels (a merged group of patches)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        options = {k: v for k, v in config.items()
                   if k not in _METADATA_KEYS and k not in cls.no_effect_options and k != "video_processor_type"}
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


class Qwen2VLImageProcessor(_QwenVisionProcessor):
    """transformers' `Qwen2VLImageProcessorPil` (the PIL path, as qwen-vl-utils preprocesses).

    Per image: to RGB -> one Pillow resize to `smart_resize`'s size -> rescale and normalise (a 256-entry table
    per channel, as BLIP's) -> patches of (C, temporal_patch_size, P, P) values, the image repeated over the
    temporal patch, ordered so each merge_size x merge_size group of patches is contiguous.
    """

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """-> {"pixel_values": float32 [sum grid_h*grid_w, C*T*P*P], "image_grid_thw": long [num_images, 3]}."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to process")
        table = torch.from_numpy(pil_value_table(self.do_rescale, self.rescale_factor, self.do_normalize,
                                                 self.image_mean, self.image_std)).view(-1)
        patches, grids = [], []
        for image in images:
            if self.do_convert_rgb:
                image = convert_to_rgb(image)
            elif image.mode != "RGB":
                raise ValueError(f"image has mode {image.mode!r} and do_convert_rgb is off; the model needs RGB")
            height, width = self.resized_size(image.height, image.width)
            if self.do_resize:
                image = image.resize((width, height), resample=self.resample)
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
            patches.append(self._patchify(pixels.unsqueeze(0), table))
            grids.append([1, height // self.patch_size, width // self.patch_size])
        return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def _patchify(self, pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        # pixels (1, H, W, C) uint8 -> (gh*gw, C*T*P*P) float32; uint8 is rearranged first, then looked up
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        _, height, width, channels = pixels.shape
        gh, gw = height // p, width // p
        x = pixels.view(gh // m, m, p, gw // m, m, p, channels)
        x = x.permute(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, ph, pw)
        values = table[x.long() + 256 * torch.arange(channels).view(channels, 1, 1)]
        values = values.unsqueeze(5).expand(gh // m, gw // m, m, m, channels, t, p, p)
        return values.reshape(gh * gw, channels * t * p * p)


def check_fps(fps: Any) -> float:
    """`fps` as a float; anything but a positive finite number is a ValueError naming it. Strings are refused,
    "2" too: options arrive as numbers (JSON or Python), so a string is a mistake upstream, and an infinite rate
    can stall the frame sampler (its next tick never moves)."""
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number (frames per second), got {fps!r}")
    return float(fps)


class Qwen2VLVideoProcessor(_QwenVisionProcessor):
    """transformers' `Qwen2VLVideoProcessor`, without torchvision.

    Per video of T RGB frames: smart resize with the video's own pixel limits, applied with
    `F.interpolate(uint8, mode="bicubic", antialias=True, align_corners=False)` (what torchvision's resize runs
    on uint8 CPU tensors); rescale and normalise fused into one float32 (x - 255 mean) / (255 std); the last
    frame repeated up to a multiple of `temporal_patch_size`; patches of (C, temporal_patch_size, P, P).

    Frame selection happens before, when the video is loaded (`fovea.multimodal.media.load_video`): `fps` is
    the rate frames are sampled at from files and the rate assumed for frames given without one, `max_frames`
    the most frames a video may have.
    """

    DEFAULT_MIN_PIXELS = 128 * 28 * 28
    DEFAULT_MAX_PIXELS = 28 * 28 * 768
    DEFAULT_FPS = 2.0
    extra_options = frozenset({"cap_pixels_per_frame", "max_video_tokens", "fps", "max_frames"})
    # frame sampling options of transformers' processor; fovea samples frames in load_video instead
    no_effect_options = _QwenVisionProcessor.no_effect_options | {"do_sample_frames", "min_frames", "num_frames",
                                                                  "return_metadata"}
    _MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}

    def __init__(self, *, cap_pixels_per_frame: bool | None = False, max_video_tokens: int = 128000,
                 fps: float | None = DEFAULT_FPS, max_frames: int = 768, **options: Any):
        super().__init__(**options)
        if self.resample not in self._MODES:
            raise ValueError(f"video resample must be BICUBIC (3) or BILINEAR (2), got {self.resample!r}")
        self.cap_pixels_per_frame = bool(cap_pixels_per_frame)
        self.max_video_tokens = int(max_video_tokens)
        self.fps = check_fps(self.DEFAULT_FPS if fps is None else fps)
        self.max_frames = int(max_frames)
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "cap_pixels_per_frame": self.cap_pixels_per_frame,
                "max_video_tokens": self.max_video_tokens, "fps": self.fps, "max_frames": self.max_frames}

    def frame_pixel_cap(self, num_frames: int) -> int:
        """max_pixels for one frame of a video of `num_frames` frames (cap_pixels_per_frame shares a budget)."""
        if not self.cap_pixels_per_frame:
            return self.max_pixels
        total = int(self.max_video_tokens * self.factor * self.factor * 0.9)
        return max(min(self.max_pixels, total * self.temporal_patch_size // num_frames), int(self.min_pixels * 1.05))

    def num_grid_t(self, num_frames: int) -> int:
        return -(-num_frames // self.temporal_patch_size)

    def __call__(self, videos: list[np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """videos: (T, H, W, 3) uint8 frames each -> {"pixel_values_videos": float32 [sum t*h*w, C*T*P*P],
        "video_grid_thw": long [num_videos, 3]}."""
        if not videos:
            raise ValueError("no videos to process")
        patches, grids = [], []
        for video in videos:
            frames = torch.as_tensor(np.asarray(video)) if not isinstance(video, torch.Tensor) else video
            if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8 or frames.shape[0] < 1:
                raise ValueError(f"a video must be (T, H, W, 3) uint8 RGB frames, got {tuple(frames.shape)} "
                                 f"{frames.dtype}")
            num_frames, height, width, _ = frames.shape
            frames = frames.permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)
            h, w = self.resized_size(height, width, max_pixels=self.frame_pixel_cap(num_frames))
            if (h, w) != (height, width):
                frames = F.interpolate(frames, size=(h, w), mode=self._MODES[self.resample], antialias=True,
                                       align_corners=False)
            patches.append(self._patchify(self._normalize(frames)))
            grids.append([self.num_grid_t(num_frames), h // self.patch_size, w // self.patch_size])
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def _normalize(self, frames: torch.Tensor) -> torch.Tensor:  # (T, 3, H, W) uint8 -> float32
        x = frames.to(torch.float32)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        if self.do_normalize:
            if self.do_rescale:  # transformers folds the rescale into mean and std
                mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
            return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return x * self.rescale_factor if self.do_rescale else x

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        # x (T, C, H, W) float32 -> (t*gh*gw, C*T'*P*P)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(tp - x.shape[0] % tp, -1, -1, -1)])
        t, channels, height, width = x.shape
        gt, gh, gw = t // tp, height // p, width // p
        x = x.view(gt, tp, channels, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, bh, bw, mh, mw, C, tp, ph, pw)
        return x.reshape(gt * gh * gw, channels * tp * p * p)


# image_processor_type (without transformers' "Pil"/"Fast" backend suffix) -> fovea's processor
_IMAGE_PROCESSORS: dict[str, type] = {"BlipImageProcessor": BlipImageProcessor,
                                      "Qwen2VLImageProcessor": Qwen2VLImageProcessor}


def get_image_processor(model_dir: str | os.PathLike):
    """The fovea processor named by the checkpoint's `image_processor_type`, configured from the checkpoint."""
    config = read_image_processor_config(model_dir)
    type_name = config.get("image_processor_type")
    base_name = type_name
    for suffix in ("Pil", "Fast"):
        if isinstance(type_name, str) and type_name.endswith(suffix):
            base_name = type_name[: -len(suffix)]
    if base_name not in _IMAGE_PROCESSORS:
        raise ValueError(f"unsupported image_processor_type {type_name!r} in {os.fspath(model_dir)!r}; "
                         f"fovea supports: {sorted(_IMAGE_PROCESSORS)}")
    return _IMAGE_PROCESSORS[base_name].from_dict(config)


def get_video_processor(model_dir: str | os.PathLike) -> Qwen2VLVideoProcessor:
    """Qwen2-VL's video processor, configured from the checkpoint (see `read_video_processor_config`)."""
    config = read_video_processor_config(model_dir)
    type_name = config.get("video_processor_type", "Qwen2VLVideoProcessor")
    if type_name not in ("Qwen2VLVideoProcessor", "Qwen2_5_VLVideoProcessor"):
        raise ValueError(f"unsupported video_processor_type {type_name!r} in {os.fspath(model_dir)!r}; "
                         f"fovea supports: ['Qwen2VLVideoProcessor']")
    # a config borrowed from the image processor (see below) names that one's type
    config = {k: v for k, v in config.items() if k != "image_processor_type"}
    return Qwen2VLVideoProcessor.from_dict(config)


def read_video_processor_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """transformers 5's order: processor_config.json's "video_processor", video_preprocessor_config.json, and
    failing both the image processor's config (the released Qwen2.5-VL checkpoints have only that one, so
    their videos use the image pixel limits)."""
    model_dir = Path(model_dir)
    processor_file = model_dir / "processor_config.json"
    if processor_file.is_file():
        processor_config = _read_json(processor_file)
        if isinstance(processor_config.get("video_processor"), dict):
            return processor_config["video_processor"]
    video_file = model_dir / "video_preprocessor_config.json"
    if video_file.is_file():
        return _read_json(video_file)
    return read_image_processor_config(model_dir)


def read_image_processor_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The image processor's options in a checkpoint directory, found the way transformers 5 finds them."""
    model_dir = Path(model_dir)
    processor_file = model_dir / "processor_config.json"
    if processor_file.is_file():
        processor_config = _read_json(processor_file)
        if isinstance(processor_config.get("image_processor"), dict):
            return processor_config["image_processor"]
    legacy_file = model_dir / "preprocessor_config.json"
    if legacy_file.is_file():
        return _read_json(legacy_file)
    raise ValueError(f"no image processor config in {os.fspath(model_dir)!r}: expected processor_config.json with "
                     f"an 'image_processor' entry, or preprocessor_config.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {os.fspath(path)!r}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{os.fspath(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


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


def _parse_resample(resample: int | Image.Resampling) -> Image.Resampling:
    try:
        return Image.Resampling(resample)
    except ValueError:
        valid = {r.name: int(r) for r in Image.Resampling}
        raise ValueError(f"resample must be a Pillow resampling filter {valid}; got {resample!r}") from None


def _per_channel(name: str, value: float | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (tuple, list)) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise ValueError(f"{name} must be a number or 3 numbers (one per RGB channel); got {value!r}")
