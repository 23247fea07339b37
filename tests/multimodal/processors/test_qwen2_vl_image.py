"""fovea's Qwen2-VL image preprocessing against transformers' `Qwen2VLImageProcessorPil` (the oracle), and the
worst-case image size against a brute-force search."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from fovea.models.qwen2_5_vl_processing import size_with_most_tokens
from fovea.multimodal.processors import (
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    get_image_processor,
    smart_resize,
)

SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 48)


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(rgba)
    image = Image.fromarray(rgba[..., :3])
    return image if mode == "RGB" else image.convert(mode)


def assert_same(ours: dict, reference) -> None:
    assert torch.equal(ours["image_grid_thw"], reference["image_grid_thw"])
    assert ours["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])  # bit for bit


# (width, height): one pixel, tiny, below min_pixels, odd sizes, extreme aspect ratios (200 is the limit),
# half-way roundings (42 = 1.5 * 28, 70 = 2.5 * 28: Python rounds both to even), above max_pixels
SIZES = [(1, 1), (5, 7), (20, 20), (42, 70), (333, 77), (1000, 20), (20, 1000), (400, 2), (2, 400), (5600, 28),
         (640, 480), (1200, 900)]


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("options", [SMALL, {}], ids=["small limits", "defaults"])
def test_images_match_transformers(width, height, options):
    image = make_image(width, height)
    reference = Qwen2VLImageProcessorPil(**options)(images=[image], return_tensors="pt")
    assert_same(Qwen2VLImageProcessor(**options)([image]), reference)


OPTION_SETS = [
    dict(SMALL, resample=Image.Resampling.BILINEAR, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    dict(SMALL, do_normalize=False),
    dict(SMALL, do_rescale=False, rescale_factor=1 / 127.5),
    dict(min_pixels=16 * 16 * 4, max_pixels=16 * 16 * 30, patch_size=8, merge_size=2, temporal_patch_size=3),
    dict(SMALL, merge_size=1),
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_options_and_a_batch_of_mixed_modes_match_transformers(options):
    images = [make_image(90, 60, "RGB", 1), make_image(33, 200, "RGBA", 2), make_image(70, 70, "L", 3),
              make_image(150, 100, "P", 4)]
    reference = Qwen2VLImageProcessorPil(**options)(images=images, return_tensors="pt")
    assert_same(Qwen2VLImageProcessor(**options)(images), reference)


def test_aspect_ratio_over_200_is_refused_like_transformers():
    with pytest.raises(ValueError):
        hf_smart_resize(2, 402)
    with pytest.raises(ValueError, match="aspect ratio"):
        Qwen2VLImageProcessor()([make_image(402, 2)])


def test_smart_resize_equals_transformers_over_many_sizes():
    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 3000, (2000, 2)).tolist():
        if max(height, width) / min(height, width) <= 200:
            for limits in ((3136, 1003520), (3136, 37632), (100352, 602112)):
                assert smart_resize(height, width, 28, *limits) == hf_smart_resize(height, width, 28, *limits)


def test_configs_as_transformers_writes_them(tmp_path):
    """transformers 5's nested processor_config.json and an older flat preprocessor_config.json with top-level
    min_pixels / max_pixels (which win over `size`, as in transformers)."""
    image = make_image(300, 200)
    nested = tmp_path / "nested"
    nested.mkdir()
    hf = Qwen2VLImageProcessorPil(**SMALL)
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": hf.to_dict()}))
    assert_same(get_image_processor(nested)([image]), hf(images=[image], return_tensors="pt"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
              "min_pixels": 3136, "max_pixels": 28 * 28 * 20, "size": {"shortest_edge": 56, "longest_edge": 1 << 30},
              "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    (legacy / "preprocessor_config.json").write_text(json.dumps(config))
    reference = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=28 * 28 * 20)(images=[image], return_tensors="pt")
    assert_same(get_image_processor(legacy)([image]), reference)


def test_unknown_options_are_errors_that_name_them():
    with pytest.raises(ValueError, match=r"\['foo'\].*valid options"):
        Qwen2VLImageProcessor.from_dict({"foo": 1})
    with pytest.raises(ValueError, match="min_pixels .* larger than max_pixels"):
        Qwen2VLImageProcessor(min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError, match="BICUBIC"):
        Qwen2VLVideoProcessor(resample=Image.Resampling.LANCZOS)


def test_with_options_and_to_dict_round_trip():
    processor = Qwen2VLImageProcessor(**SMALL)
    assert Qwen2VLImageProcessor.from_dict(processor.to_dict()).to_dict() == processor.to_dict()
    bigger = processor.with_options(max_pixels=28 * 28 * 100)
    assert bigger.max_pixels == 28 * 28 * 100 and processor.max_pixels == SMALL["max_pixels"]


# ---------------------------------------------------------------------------------------------- worst case


@pytest.mark.parametrize("min_pixels,max_pixels",
                         [(3136, 37632), (1568, 6272), (784, 784), (28 * 28 * 30, 28 * 28 * 31)])
def test_size_with_most_tokens_is_the_true_worst_case(min_pixels, max_pixels):
    """No input size gives more tokens (searched over every shape up to 80 x 4000), and the size found does.

    For small pixel limits that is far more than max_pixels allows: smart_resize keeps a thin side at one
    token, so a 1:200 image of 37632 pixels' budget (48 tokens) becomes 1 x 97 tokens."""
    def tokens(h, w):
        rh, rw = smart_resize(h, w, 28, min_pixels, max_pixels)
        return rh * rw // 28 // 28

    best = max(tokens(h, w) for h in range(1, 81) for w in range(h, min(200 * h, 4000) + 1))
    height, width = size_with_most_tokens(28, min_pixels, max_pixels)
    assert tokens(height, width) == best
