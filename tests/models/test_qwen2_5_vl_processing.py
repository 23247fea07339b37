"""Qwen2.5-VL's multimodal processor: prompt expansion and tensors as transformers' processor makes them,
options, precomputed embeddings, and the worst case used to size memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.multimodal.processors import Qwen2VLVideoProcessor
from fovea.multimodal.media import LoadedVideo
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, build_tiny_qwen2_5_vl, hf_image_processor

PROMPT = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}and{IMAGE_PLACEHOLDER}: which one is bigger?<|im_end|>\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_proc")))


def make_processor(ckpt, **mm_processor_kwargs):
    config = transformers.AutoConfig.from_pretrained(ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    ctx = InputProcessingContext(ckpt, config, tokenizer, mm_processor_kwargs)
    return MULTIMODAL_REGISTRY.create_processor(Qwen2_5_VLForConditionalGeneration, ctx)


def image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def frames(num_frames, width, height, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def apply(processor, prompt, images=(), videos=(), **mm_kwargs):
    items = {k: list(v) for k, v in (("image", images), ("video", videos)) if v}
    hashes = {m: [f"{m}{i}" for i in range(len(v))] for m, v in items.items()}
    return processor.apply(prompt, items, hashes, mm_kwargs)


def expanded_ids(tokenizer, prompt, counts: list[tuple[str, int]]) -> list[int]:
    """What transformers' Qwen2_5_VLProcessor does: each pad in the text, in order, repeated to its count."""
    pieces, rest = [], prompt
    for pad, count in counts:
        before, _, rest = rest.partition(pad)
        pieces.append(before + pad * count)
    return tokenizer("".join(pieces) + rest).input_ids


def test_images_expand_and_match_transformers(ckpt):
    processor = make_processor(ckpt)
    images = [image(200, 150, 1), image(40, 300, 2)]
    out = apply(processor, PROMPT, images)
    reference = hf_image_processor(ckpt)(images=images, return_tensors="pt")
    counts = (reference["image_grid_thw"].prod(-1) // 4).tolist()
    tokenizer = processor.info.get_tokenizer()
    assert out.prompt_token_ids == expanded_ids(tokenizer, PROMPT, [("<|image_pad|>", n) for n in counts])
    pad = processor.info.get_image_token_id()
    for feature, count in zip(out.mm_features, counts):
        assert feature.modality == "image" and feature.length == count and feature.is_embed is None
        assert out.prompt_token_ids[feature.offset:feature.offset + count] == [pad] * count
        assert out.prompt_token_ids[feature.offset - 1] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert torch.equal(torch.cat([f.data["pixel_values"] for f in out.mm_features]), reference["pixel_values"])
    assert torch.equal(torch.cat([f.data["image_grid_thw"] for f in out.mm_features]), reference["image_grid_thw"])


def test_video_items_and_their_seconds_per_patch(ckpt):
    processor = make_processor(ckpt)
    prompt = f"{VIDEO_PLACEHOLDER}{IMAGE_PLACEHOLDER}{VIDEO_PLACEHOLDER}what happens?"
    videos = [frames(5, 160, 120), LoadedVideo(frames(4, 60, 90, 1), fps=24.0)]
    out = apply(processor, prompt, [image(90, 60)], videos)
    assert [f.modality for f in out.mm_features] == ["video", "image", "video"]
    first, _, second = out.mm_features
    assert first.data["video_grid_thw"].tolist() == [[3, 4, 6]] and first.length == 18
    # frames without a rate are at transformers' 24 fps, 2 frames a patch (tests/multimodal/test_video_sampling.py)
    assert first.data["second_per_grid_ts"].tolist() == [pytest.approx(2 / 24)]
    assert second.data["second_per_grid_ts"].tolist() == [pytest.approx(2 / 24)]
    direct = Qwen2VLVideoProcessor.from_dict(processor.info.get_video_processor().to_dict())([videos[0]])
    assert torch.equal(first.data["pixel_values_videos"], direct["pixel_values_videos"])
    slower = apply(processor, prompt, [image(90, 60)], [videos[0], LoadedVideo(videos[1].frames, fps=4.0)])
    assert slower.mm_features[2].data["second_per_grid_ts"].tolist() == [0.5]  # a known rate is the frames' own


def test_pixel_limits_per_model_and_per_request(ckpt):
    reference = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=28 * 28 * 8)(images=[image(200, 150)],
                                                                                  return_tensors="pt")
    per_model = apply(make_processor(ckpt, max_pixels=28 * 28 * 8), PROMPT, [image(200, 150), image(20, 20)])
    assert torch.equal(per_model.mm_features[0].data["pixel_values"], reference["pixel_values"])
    per_request = apply(make_processor(ckpt), PROMPT, [image(200, 150), image(20, 20)], max_pixels=28 * 28 * 8)
    assert torch.equal(per_request.mm_features[0].data["pixel_values"], reference["pixel_values"])
    with pytest.raises(ValueError, match=r"unknown mm_processor_kwargs \['size'\]"):
        apply(make_processor(ckpt), PROMPT, [image(20, 20), image(20, 20)], size=4)
    small = make_processor(ckpt, max_pixels=28 * 28 * 20)
    sized_for = small.info.get_max_image_tokens()
    # the message reaches HTTP clients too: it names the server's flag beside the Python argument
    with pytest.raises(ValueError, match=f"exceeds the {sized_for} this engine was sized for; send a smaller "
                                         f"image, .*fovea serve --mm-processor-kwargs"):
        apply(small, PROMPT, [image(20, 20), image(600, 400)], max_pixels=28 * 28 * 200)


def test_placeholders_must_match_items(ckpt):
    processor = make_processor(ckpt)
    with pytest.raises(ValueError, match="more image placeholders than the 1 image item"):
        apply(processor, PROMPT, [image(20, 20)])


def test_precomputed_embeds_as_dict_items(ckpt):
    processor = make_processor(ckpt)
    hidden = processor.info.get_hf_config().text_config.hidden_size
    items = [{"image_embeds": torch.randn(6, hidden), "image_grid_thw": torch.tensor([1, 4, 6])},
             {"image_embeds": torch.randn(4, hidden), "image_grid_thw": torch.tensor([[1, 2, 8]])}]
    out = apply(processor, PROMPT, items)
    assert [f.length for f in out.mm_features] == [6, 4]
    assert torch.equal(out.mm_features[1].data["image_embeds"], items[1]["image_embeds"])
    assert out.mm_features[1].data["image_grid_thw"].tolist() == [[1, 2, 8]]
    with pytest.raises(ValueError, match="cannot mix"):
        apply(processor, PROMPT, [items[0], image(20, 20)])
    with pytest.raises(ValueError, match=r"image_embeds must be \[6, 64\]"):
        apply(processor, PROMPT, [{"image_embeds": torch.randn(5, hidden), "image_grid_thw": [1, 4, 6]}, items[1]])


def test_worst_case_items_and_dummy_inputs(ckpt):
    """get_mm_max_tokens_per_item is what the dummy inputs really produce; images beyond what fits are dropped."""
    processor = make_processor(ckpt)
    seq_len = 400
    most = processor.info.get_mm_max_tokens_per_item(seq_len, {"image": 1 << 30, "video": 4})
    assert most["image"] == 97  # a 1:200 image, not the 48 tokens of max_pixels (see size_with_most_tokens)
    # video frames: 1:200 ones give 40 tokens per temporal patch; a video alone may fill seq_len
    assert most["video"] == 40 * (seq_len // 40)
    dummy = processor.dummy_inputs.get_dummy_processor_inputs(seq_len, {"image": 3, "video": 1})
    out = apply(processor, dummy.prompt, dummy.mm_data["image"], dummy.mm_data["video"])
    images = [f for f in out.mm_features if f.modality == "image"]
    video, = [f for f in out.mm_features if f.modality == "video"]
    assert [f.length for f in images] == [97] * 3
    assert video.length == 40 * ((seq_len - 3 * 97) // 40)  # the video fills what the images leave
    unlimited = processor.dummy_inputs.get_dummy_processor_inputs(seq_len, {"image": 1 << 30})
    assert len(unlimited.mm_data["image"]) == 5  # ceil(400 / 97): more images cannot be in one step


def test_dummy_inputs_leave_out_modalities_with_no_items(ckpt):
    processor = make_processor(ckpt)
    for counts, modalities in [({"image": 0, "video": 1}, {"video"}), ({"image": 2, "video": 0}, {"image"}),
                               ({"image": 0, "video": 0}, set())]:
        dummy = processor.dummy_inputs.get_dummy_processor_inputs(400, counts)
        assert set(dummy.mm_data) == modalities, counts
