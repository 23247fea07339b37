"""Steps and option checks shared by fovea's image and video processors.

transformers' PIL backend, step for step: `convert_to_rgb` (its alpha rule), and rescale + normalise folded into
one (3, 256) table per uint8 value (`pil_value_table`), which every PIL-path processor applies as a gather.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Keys in a processor config that say what to build, not how to process.
METADATA_KEYS = frozenset({"image_processor_type", "processor_class", "_processor_class", "feature_extractor_type",
                           "auto_map"})
# transformers `ImagesKwargs` that never change the pixel values this PIL pipeline computes: output container,
# device, batching strategy, input layout of arrays (we take PIL images), and a processor-level token count.
NO_EFFECT_KEYS = frozenset({"return_tensors", "data_format", "input_data_format", "device", "disable_grouping",
                            "image_seq_length"})


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


def apply_value_table(pixels: list[np.ndarray], value_table: np.ndarray, why_sizes_differ: str) -> torch.Tensor:
    """`pixel_values` [N, 3, H, W] float32 of same-sized (H, W, 3) uint8 images through a (3, 256) `pil_value_table`;
    `why_sizes_differ` says, in the error, which option let the sizes differ."""
    if len({p.shape for p in pixels}) > 1:
        raise ValueError(f"images differ in size {why_sizes_differ}, so they cannot form one batch: "
                         f"{[p.shape[:2] for p in pixels]}")
    batch = np.stack(pixels)  # (N, H, W, 3) uint8
    num_images, height, width, _ = batch.shape
    pixel_values = np.empty((num_images, 3, height, width), dtype=np.float32)
    for channel in range(3):
        np.take(value_table[channel], batch[..., channel], out=pixel_values[:, channel], mode="clip")
    return torch.from_numpy(pixel_values)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' rule: any alpha band or `transparency` entry (P, or RGB/L with a tRNS colour) means
    composite onto opaque white; everything else is a plain Pillow `convert("RGB")`."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_fps(fps: Any) -> float:
    """`fps` as a float; anything but a positive finite number is a ValueError naming it. Strings are refused,
    "2" too: options arrive as numbers (JSON or Python), so a string is a mistake upstream, and an infinite rate
    can stall the frame sampler (its next tick never moves)."""
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number (frames per second), got {fps!r}")
    return float(fps)


def parse_pixel_value_steps(do_resize: bool, resample, do_rescale: bool, rescale_factor, do_normalize: bool,
                            image_mean, image_std) -> tuple:
    """The options of the resample / rescale / normalize steps, checked and parsed, plus their (3, 256) value table:
    (resample, rescale_factor, image_mean, image_std, value_table); an option a step that is on needs and lacks is a
    ValueError naming it."""
    if do_resize and resample is None:
        raise ValueError("resample must be set when do_resize is on")
    needed = {"rescale_factor": (do_rescale, rescale_factor), "image_mean": (do_normalize, image_mean),
              "image_std": (do_normalize, image_std)}
    missing = [name for name, (is_on, value) in needed.items() if is_on and value is None]
    if missing:
        raise ValueError(f"{missing} must be set when the step that uses them is on")
    rescale_factor = None if rescale_factor is None else float(rescale_factor)
    image_mean = None if image_mean is None else per_channel("image_mean", image_mean)
    image_std = None if image_std is None else per_channel("image_std", image_std)
    if do_normalize and 0.0 in image_std:
        raise ValueError(f"image_std must not contain 0, got {image_std}")
    table = pil_value_table(do_rescale, rescale_factor, do_normalize, image_mean, image_std)
    return None if resample is None else parse_resample(resample), rescale_factor, image_mean, image_std, table


def parse_resample(resample: int | Image.Resampling) -> Image.Resampling:
    try:
        return Image.Resampling(resample)
    except ValueError:
        valid = {r.name: int(r) for r in Image.Resampling}
        raise ValueError(f"resample must be a Pillow resampling filter {valid}; got {resample!r}") from None


def per_channel(name: str, value: float | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (tuple, list)) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise ValueError(f"{name} must be a number or 3 numbers (one per RGB channel); got {value!r}")
