"""Properties of the multimodal processors under random image sizes (1 x N, aspect ratios past Qwen's limit of
200), every Pillow mode a decoder can hand over, random frame counts and random `mm_processor_kwargs`, valid or not.

- fovea's image processors equal transformers' PIL processors (`BlipImageProcessorPil`, `Qwen2VLImageProcessorPil`,
  the oracle) on whatever they both accept, and refuse with ValueError where transformers raises.
- Qwen2.5-VL's processor (what the engine runs for a request) either refuses with ValueError or puts exactly as
  many placeholder tokens in the prompt as the model's vision tower then produces embedding rows for the item.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from hypothesis import event
from hypothesis import strategies as st
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.models.weights import load_model
from fovea.multimodal.media import LoadedVideo
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.processors import BlipImageProcessor, Qwen2VLImageProcessor
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from tests.fuzzing import fuzz
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, build_tiny_qwen2_5_vl

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"]
MAX_MODEL_RUN_TOKENS = 64  # the tiny vision tower runs on items up to this many tokens (cheap on CPU)


def make_image(width: int, height: int, mode: str, seed: int, with_transparency: bool) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode in ("I", "I;16", "F"):  # wide greys as a 16-bit PNG or a float TIFF decodes them
        values = rng.integers(0, 65536, (height, width)).astype(np.int32 if mode != "F" else np.float32)
        image = Image.fromarray(values, mode="I" if mode != "F" else "F")
        return image.convert(mode) if mode == "I;16" else image
    image = image.convert(mode)
    if with_transparency and mode in ("P", "L", "RGB"):
        image.info["transparency"] = 0 if mode != "RGB" else (0, 0, 0)  # a tRNS entry, as PNG decodes it
    return image


sizes = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),  # small and odd
    st.tuples(st.just(1), st.integers(1, 400)),  # 1 x N
    st.tuples(st.integers(1, 400), st.just(1)),
    st.integers(1, 3).flatmap(lambda side: st.tuples(st.just(side), st.integers(190 * side, 215 * side))),  # ~200:1
)
images = st.builds(lambda size, mode, seed, alpha: make_image(size[0], size[1], mode, seed, alpha),
                   sizes, st.sampled_from(MODES), st.integers(0, 1000), st.booleans())


def outcome(run):
    """The result, or the exception's type (ValueError for fovea's refusals)."""
    try:
        return run()
    except Exception as err:  # the property compares types: any other exception fails the test below
        return err


@fuzz(60, image=images, options=st.fixed_dictionaries({}, optional={
    "min_pixels": st.sampled_from([28 * 28, 28 * 28 * 4, 3136]),
    "max_pixels": st.sampled_from([28 * 28 * 4, 28 * 28 * 16, 28 * 28 * 48]),
    "merge_size": st.sampled_from([1, 2]),
}))
def test_qwen_image_processor_equals_transformers_or_refuses_alike(image, options):
    ours = outcome(lambda: Qwen2VLImageProcessor(**options)([image]))
    event(f"mode {image.mode}: {'refused' if isinstance(ours, Exception) else 'processed'}")
    if isinstance(ours, Exception):
        assert isinstance(ours, ValueError), repr(ours)
        theirs = outcome(lambda: Qwen2VLImageProcessorPil(**options)(images=[image], return_tensors="pt"))
        if "min_pixels" in str(ours) and "max_pixels" in str(ours):
            return  # fovea checks min <= max up front; transformers only misbehaves later
        assert isinstance(theirs, Exception), f"fovea refused what transformers takes: {ours}"
        return
    theirs = Qwen2VLImageProcessorPil(**options)(images=[image], return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


@fuzz(40, image=images, size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
      resample=st.sampled_from([0, 1, 2, 3, 4, 5]))
def test_blip_image_processor_equals_transformers(image, size, resample):
    options = dict(size={"height": size[0], "width": size[1]}, resample=resample)
    ours = BlipImageProcessor(**options)([image])["pixel_values"]
    theirs = BlipImageProcessorPil(**options)(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, theirs)


# ---- Qwen2.5-VL's processor: placeholders == what the model produces -------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """(processor, fovea model) of one tiny checkpoint."""
    ckpt = str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_props"), seed=0))
    config = transformers.AutoConfig.from_pretrained(ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    processor = MULTIMODAL_REGISTRY.create_processor(Qwen2_5_VLForConditionalGeneration,
                                                     InputProcessingContext(ckpt, config, tokenizer, {}))
    model, _ = load_model(Qwen2_5_VLForConditionalGeneration, config, ckpt, torch.float32)
    return processor, model.eval()


valid_options = st.fixed_dictionaries({}, optional={
    "min_pixels": st.sampled_from([28 * 28, 28 * 28 * 2, 28 * 28 * 4, 3136]),
    "max_pixels": st.sampled_from([28 * 28 * 8, 28 * 28 * 16, 28 * 28 * 48, 28 * 28 * 4096]),
    "fps": st.sampled_from([0.5, 1, 2.0, 24]),
    "min_frames": st.sampled_from([1, 2, 4]),
    "max_frames": st.sampled_from([1, 2, 3, 8, 768]),
})
invalid_values = {
    "min_pixels": [0, -5, 1.5, "784", True], "max_pixels": [0, 2.5, "x", 1], "fps": [0, -1.0, float("nan"),
    float("inf"), "2", True], "min_frames": [0, 1.0, "4"], "max_frames": [0, 2.5, -2], "not_an_option": [1],
}
invalid_options = st.builds(lambda options, key, index: {**options, key: invalid_values[key][index % len(
    invalid_values[key])]}, valid_options, st.sampled_from(sorted(invalid_values)), st.integers(0, 5))
# mostly options that work, so that most examples reach the placeholders; the others must be a ValueError
mm_kwargs = st.one_of(valid_options, valid_options, invalid_options)
frame_stacks = st.builds(
    lambda t, w, h, seed, fps: LoadedVideo(np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), np.uint8), fps),
    st.integers(1, 9), st.integers(1, 90), st.integers(1, 90), st.integers(0, 100),
    st.sampled_from([None, 1.0, 2.0, 30.0]))


@fuzz(30, items=st.lists(st.one_of(images.map(lambda i: ("image", i)), frame_stacks.map(lambda v: ("video", v))),
                         min_size=1, max_size=3),
      kwargs=mm_kwargs)
def test_qwen_placeholders_equal_the_embeddings_the_model_produces(tiny_qwen, items, kwargs):
    processor, model = tiny_qwen
    prompt = "<|im_start|>user\n" + "".join(IMAGE_PLACEHOLDER if m == "image" else VIDEO_PLACEHOLDER
                                             for m, _ in items) + "What is this?<|im_end|>\n"
    mm_items: dict[str, list] = {}
    for modality, item in items:
        mm_items.setdefault(modality, []).append(item)
    hashes = {m: [f"{m}{i}" for i in range(len(v))] for m, v in mm_items.items()}
    try:
        inputs = processor.apply(prompt, mm_items, hashes, kwargs)
    except ValueError as err:
        event(f"refused: {str(err)[:30]}")
        return  # the documented refusal: an invalid option, an aspect ratio over 200, too many tokens
    event("processed")
    info = processor.info
    pad_ids = {"image": info.get_image_token_id(), "video": info.get_video_token_id()}
    features = inputs.mm_features
    assert sorted(f.modality for f in features) == sorted(m for m, _ in items)
    ids = inputs.prompt_token_ids
    for modality, pad in pad_ids.items():  # every pad token belongs to exactly one item of its modality
        assert ids.count(pad) == sum(f.length for f in features if f.modality == modality)
    merge = info.get_hf_config().vision_config.spatial_merge_size
    for feature in features:
        assert set(ids[feature.offset:feature.offset + feature.length]) == {pad_ids[feature.modality]}
        grid = feature.data[f"{feature.modality}_grid_thw"].reshape(-1)
        pixels = feature.data["pixel_values" if feature.modality == "image" else "pixel_values_videos"]
        assert feature.num_embeds == feature.length == int(grid.prod()) // merge**2 == pixels.shape[0] // merge**2
        if feature.length <= MAX_MODEL_RUN_TOKENS:
            with torch.no_grad():
                (embeds,) = model.embed_multimodal(**feature.data)
            assert embeds.shape == (feature.length, info.get_hf_config().text_config.hidden_size)
