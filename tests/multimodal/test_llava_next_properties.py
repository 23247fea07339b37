"""Properties of LLaVA-NeXT's processing under random images (every Pillow mode, small and odd sizes, 1 x N, ~200:1;
tests/multimodal/test_processors_properties.py's strategies): the tiles equal transformers'
`LlavaNextImageProcessorPil`'s, and the prompt gets exactly as many placeholders as transformers' `LlavaNextProcessor`
counts and as fovea's model then produces embedding rows for the image."""
from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import event
from hypothesis import strategies as st

from fovea.models.llava_next import LlavaNextForConditionalGeneration
from fovea.models.weights import load_model
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from tests.fuzzing import fuzz
from tests.multimodal.test_processors_properties import images
from tests.oracle.llava_next import build_tiny_llava_next, hf_processor


@pytest.fixture(scope="module")
def tiny_llava_next(tmp_path_factory):
    """(checkpoint, processor, fovea model) of one tiny checkpoint."""
    ckpt = str(build_tiny_llava_next(tmp_path_factory.mktemp("llava_next_props"), seed=0))
    config = transformers.AutoConfig.from_pretrained(ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    processor = MULTIMODAL_REGISTRY.create_processor(LlavaNextForConditionalGeneration,
                                                     InputProcessingContext(ckpt, config, tokenizer, {}))
    model, _ = load_model(LlavaNextForConditionalGeneration, config, ckpt, torch.float32)
    return ckpt, processor, model.eval()


@fuzz(30, image=images, position=st.sampled_from(["start", "middle", "end"]))
def test_tiles_and_placeholders_equal_transformers_and_the_model(tiny_llava_next, image, position):
    ckpt, processor, model = tiny_llava_next
    prompt = {"start": "<image>\nWhat is this?", "middle": "USER: <image>\nHi ASSISTANT:", "end": "Look: <image>"}
    inputs = processor.apply(prompt[position], {"image": [image]}, {"image": ["h0"]})
    (feature,) = inputs.mm_features
    hf = hf_processor(ckpt)
    theirs = hf(text=prompt[position], images=[image], return_tensors="pt")
    num_tiles = feature.data["pixel_values"].shape[0]
    event(f"{num_tiles - 1} tiles")
    assert torch.equal(feature.data["image_sizes"], theirs["image_sizes"])
    assert torch.equal(feature.data["pixel_values"], theirs["pixel_values"][0, :num_tiles])
    assert not theirs["pixel_values"][0, num_tiles:].any()  # transformers' padding tiles, if any, are zeros
    assert inputs.prompt_token_ids == theirs["input_ids"][0].tolist()
    with torch.no_grad():
        (embeds,) = model.embed_multimodal(**feature.data)
    assert embeds.shape[0] == feature.length == feature.num_embeds
