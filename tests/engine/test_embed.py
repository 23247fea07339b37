"""LLM.embed on tiny BLIP-2 checkpoints against transformers' feature methods on the same weights (float32).

Blip2Model.get_image_features / get_qformer_features and Blip2ForConditionalGeneration.get_image_features read
the same safetensors (Blip2Model's names are the same, the language model's weights are just unused)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Model, Blip2Processor

from fovea import LLM
from tests.oracle.blip2 import build_tiny_blip2

NUM_IMAGES = 5


def make_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(37, 41, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # vision, Q-Former and text widths all differ, so a stage mix-up cannot go unnoticed by shape alone
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2"), vision_hidden=24, qformer_hidden=32, text_hidden=40)


@pytest.fixture(scope="module")
def llm(model_dir):
    # max_num_seqs=2: five images run as three batches, so chunking is exercised
    return LLM(str(model_dir), dtype="float32", max_num_seqs=2)


@pytest.fixture(scope="module")
def expected(model_dir):
    images = [make_image(i) for i in range(NUM_IMAGES)]
    pixel_values = Blip2Processor.from_pretrained(model_dir)(images=images, return_tensors="pt").pixel_values
    base = Blip2Model.from_pretrained(model_dir, dtype=torch.float32).eval()
    full = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return images, {
            "vision": base.get_image_features(pixel_values=pixel_values).last_hidden_state,
            "qformer": base.get_qformer_features(pixel_values=pixel_values),
            "projected": full.get_image_features(pixel_values=pixel_values).pooler_output,
        }


@pytest.mark.parametrize("pooling", ["vision", "qformer", "projected"])
def test_embeddings_match_transformers(llm, expected, pooling):
    images, want = expected
    # half as PIL images, half as vLLM prompts
    inputs = [img if i % 2 else {"prompt": "", "multi_modal_data": {"image": img}} for i, img in enumerate(images)]
    outs = llm.embed(inputs, pooling=pooling)
    assert len(outs) == NUM_IMAGES and len({o.request_id for o in outs}) == NUM_IMAGES
    got = torch.stack([o.outputs.embedding for o in outs])
    assert got.dtype == torch.float32 and got.shape == want[pooling].shape
    assert want[pooling].std() > 0.1 and (want[pooling][0] - want[pooling][1]).abs().max() > 1e-2  # not trivial
    torch.testing.assert_close(got, want[pooling], atol=1e-5, rtol=1e-5)


def test_default_pooling_is_projected(llm, expected):
    images, want = expected
    torch.testing.assert_close(llm.embed(images[0])[0].outputs.embedding, want["projected"][0], atol=1e-5, rtol=1e-5)


def test_embeddings_do_not_depend_on_the_batch(llm, expected):
    images, _ = expected
    alone = llm.embed([images[3]], pooling="qformer")[0].outputs.embedding
    batched = llm.embed(images, pooling="qformer")[3].outputs.embedding
    torch.testing.assert_close(alone, batched, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad, message", [
    ("a photo of a cat", "text-only inputs cannot be embedded"),
    ({"prompt": "a cat"}, "text-only inputs cannot be embedded"),
    ({"prompt": "a cat", "multi_modal_data": {"image": make_image(0)}}, "empty prompt"),
    ({"prompt": "", "multi_modal_data": {"image": [make_image(0), make_image(1)]}}, "2 images"),
])
def test_bad_inputs_are_refused_by_index(llm, expected, bad, message):
    images, _ = expected
    with pytest.raises(ValueError, match=message) as info:
        llm.embed([images[0], bad])
    assert "input 1" in str(info.value)


def test_unknown_pooling_names_the_choices(llm, expected):
    with pytest.raises(ValueError, match="unknown pooling 'mean'; this model offers projected, qformer, vision"):
        llm.embed(expected[0][:1], pooling="mean")


def test_models_without_image_only_features_refuse_by_name(tmp_path):
    from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

    qwen = LLM(str(build_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0)), dtype="float32", num_kv_blocks=64)
    with pytest.raises(ValueError, match="Qwen2_5_VLForConditionalGeneration does not serve embeddings; BLIP-2"):
        qwen.embed([make_image(0)])
