"""InputProcessor: text, token-id and multimodal prompts become Requests (placeholders expanded, items hashed
by content and options, Qwen2.5-VL's M-RoPE positions equal to transformers' `get_rope_index`), and each
documented error is a ValueError naming the problem."""
from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
import transformers

from fovea.engine.input_processor import InputProcessor, profile_mm_features
from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from fovea.sampling_params import SamplingParams
from tests.e2e.qwen_cases import chat, frames, image
from tests.oracle.qwen2_5_vl import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    build_tiny_qwen2_5_vl,
    hf_model,
    mm_token_type_ids,
)

MAX_MODEL_LEN = 256
PARAMS = SamplingParams(max_tokens=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("input_qwen"), seed=0))


@pytest.fixture(scope="module")
def parts(ckpt):
    hf_config = transformers.AutoConfig.from_pretrained(ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    processor = MULTIMODAL_REGISTRY.create_processor(
        Qwen2_5_VLForConditionalGeneration, InputProcessingContext(ckpt, hf_config, tokenizer))
    return hf_config, tokenizer, processor


def make(parts, *, multimodal: bool = True, limits=None, **kwargs) -> InputProcessor:
    hf_config, tokenizer, processor = parts
    return InputProcessor(
        tokenizer=tokenizer, processor=processor if multimodal else None, max_model_len=MAX_MODEL_LEN,
        vocab_size=hf_config.text_config.vocab_size,
        mm_limits=(limits or {"image": 2, "video": 1}) if multimodal else {}, mm_processor_kwargs=kwargs,
        eos_token_id=tokenizer.eos_token_id,
        mrope_positions=functools.partial(Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions, hf_config)
        if multimodal else None,
    )


def png_bytes(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_text_and_token_id_prompts(parts):
    _, tokenizer, _ = parts
    processor = make(parts, multimodal=False)
    text = "the quick brown fox"
    request = processor.process("r", text, PARAMS, arrival_index=3)
    assert request.prompt_token_ids == tokenizer(text).input_ids and request.prompt == text
    assert (request.mm_features, request.mrope_positions, request.arrival_index) == ([], None, 3)
    assert request.eos_token_id == tokenizer.eos_token_id and request.sampling_params is PARAMS
    by_ids = processor.process("s", {"prompt_token_ids": [5, 6, 7]}, PARAMS)
    assert by_ids.prompt_token_ids == [5, 6, 7] and by_ids.prompt is None
    assert processor.process("t", [5, 6, 7], PARAMS).prompt_token_ids == [5, 6, 7]


def test_max_tokens_none_is_resolved_on_a_copy(parts):
    params = SamplingParams(max_tokens=None)
    request = make(parts, multimodal=False).process("r", [5, 6, 7], params)
    assert request.sampling_params.max_tokens == MAX_MODEL_LEN - 3 and params.max_tokens is None


def test_text_prompt_of_an_mrope_model_gets_text_positions(parts):
    request = make(parts).process("r", [5, 6, 7, 8], PARAMS)
    assert torch.equal(request.mrope_positions, torch.arange(4).expand(3, -1))
    assert request.mrope_position_delta == 0


def test_placeholders_expand_and_positions_equal_get_rope_index(ckpt, parts):
    hf_config, _, _ = parts
    img = image(1, 112, 84)
    video = frames(2, 4, 56, 56)
    request = make(parts).process(
        "r", {"prompt": chat(f"{IMAGE_PLACEHOLDER} then {VIDEO_PLACEHOLDER} what?"),
              "multi_modal_data": {"image": img, "video": video}}, PARAMS)
    ids = request.prompt_token_ids
    picture, clip = request.mm_features
    for feature, token_id in ((picture, hf_config.image_token_id), (clip, hf_config.video_token_id)):
        t, h, w = feature.data[f"{feature.modality}_grid_thw"].reshape(-1).tolist()
        assert feature.length == t * h * w // 4 == ids.count(token_id)
        assert ids[feature.offset:feature.offset + feature.length] == [token_id] * feature.length
        assert ids[feature.offset - 1] == hf_config.vision_start_token_id
    assert picture.data["image_grid_thw"].reshape(-1).tolist() == [1, 6, 8]  # 84 x 112 px at 14 px per patch

    input_ids = torch.tensor([ids])
    expected, delta = hf_model(ckpt).model.get_rope_index(
        input_ids, mm_token_type_ids(ckpt, input_ids), image_grid_thw=picture.data["image_grid_thw"],
        video_grid_thw=clip.data["video_grid_thw"], second_per_grid_ts=clip.data["second_per_grid_ts"])
    assert torch.equal(request.mrope_positions, expected[:, 0]) and request.mrope_position_delta == int(delta)


def test_items_hash_by_content_and_options(parts, tmp_path):
    processor = make(parts)
    img = image(4, 60, 40)
    path = tmp_path / "img.png"
    path.write_bytes(png_bytes(img))

    def mm_hash(item, **options) -> str:
        prompt = {"prompt": IMAGE_PLACEHOLDER, "multi_modal_data": {"image": item}}
        if options:
            prompt["mm_processor_kwargs"] = options
        return processor.process("r", prompt, PARAMS).mm_features[0].mm_hash

    same = {mm_hash(img), mm_hash(png_bytes(img)), mm_hash(str(path)), mm_hash(np.asarray(img))}
    assert len(same) == 1
    assert mm_hash(image(5, 60, 40)) not in same
    assert mm_hash(img, max_pixels=28 * 28 * 8) not in same
    # the engine's options count as the request's own do
    assert make(parts, max_pixels=28 * 28 * 8).process(
        "r", {"prompt": IMAGE_PLACEHOLDER, "multi_modal_data": {"image": img}}, PARAMS
    ).mm_features[0].mm_hash == mm_hash(img, max_pixels=28 * 28 * 8)


def test_profile_features_are_the_worst_case_the_limits_allow(parts):
    _, _, processor = parts
    info = processor.info
    most = info.get_mm_max_tokens_per_item(MAX_MODEL_LEN, {"image": 4, "video": 1})
    features = profile_mm_features(processor, MAX_MODEL_LEN, 2048, most, {"image": 4, "video": 1})
    largest = max(most, key=most.get)
    assert [f.modality for f in features] == [largest] and features[0].num_embeds == most[largest]
    only_images = profile_mm_features(processor, MAX_MODEL_LEN, 2048, {"image": most["image"]}, {"image": 4})
    assert {f.modality for f in only_images} == {"image"} and len(only_images) <= 4
    assert profile_mm_features(None, MAX_MODEL_LEN, 2048, {}, {}) == []


@pytest.mark.parametrize("prompt, params, message", [
    (3.5, PARAMS, "a prompt must be a str, a list of token ids or a dict; got float"),
    ({"prompt": "a", "images": []}, PARAMS, r"unknown prompt key\(s\) \['images'\]; valid keys"),
    ({"prompt": "a", "prompt_token_ids": [1]}, PARAMS, "exactly one of 'prompt'"),
    ({"multi_modal_data": {}}, PARAMS, "exactly one of 'prompt'"),
    ({"prompt": [1, 2]}, PARAMS, "'prompt' must be a str; got list"),
    ([], PARAMS, "the prompt is empty"),
    ([5, 10**6], PARAMS, r"prompt token id\(s\) \[1000000\] outside the vocabulary"),
    ([5, -1], PARAMS, r"prompt token id\(s\) \[-1\] outside the vocabulary"),
    ([5] * 250, SamplingParams(max_tokens=10), "plus max_tokens=10 is 260 tokens, over max_model_len=256"),
    ({"prompt": "a", "multi_modal_data": {"audio": b"x"}}, PARAMS,
     "does not take 'audio' input; modalities it takes: image, video"),
    ({"prompt": "a", "multi_modal_data": {"image": [image(0, 30, 30)] * 3}}, PARAMS,
     r"3 image item\(s\) given but at most 2 per prompt"),
    ({"prompt": "a", "multi_modal_data": {"video": torch.zeros(2, 3)}}, PARAMS, "a video cannot be a torch tensor"),
    ({"prompt": "a", "multi_modal_data": {"image": b"not an image"}}, PARAMS, "could not decode"),
])
def test_each_error_names_the_problem(parts, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        make(parts).process("r", prompt, params)


def test_a_text_only_model_refuses_media(parts):
    with pytest.raises(ValueError, match=r"does not take 'image' input; modalities it takes: none \(text only\)"):
        make(parts, multimodal=False).process("r", {"prompt": "a", "multi_modal_data": {"image": image(0, 9, 9)}},
                                              PARAMS)
