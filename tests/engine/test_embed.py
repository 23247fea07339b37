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


def test_repeated_images_come_from_the_cache_without_running_the_vision_tower(model_dir, expected):
    """Counted on the real vision module with a forward hook: a second embed of the same image runs nothing, and
    gives the same embedding; a new image beside it runs alone; an image repeated within a call runs once."""
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=4)
    images, want = expected
    vision = llm.llm_engine.runner.model.vision_model
    batch_sizes = []
    handle = vision.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        first = llm.embed([images[0]])[0].outputs.embedding
        assert batch_sizes == [1]
        again = llm.embed([{"prompt": "", "multi_modal_data": {"image": images[0].copy()}}])[0].outputs.embedding
        assert batch_sizes == [1]  # same content, another object: a hit
        assert torch.equal(first, again)
        torch.testing.assert_close(first, want["projected"][0], atol=1e-5, rtol=1e-5)
        mixed = llm.embed([images[1], images[0], images[1]])
        assert batch_sizes == [1, 1]  # only images[1], once
        assert torch.equal(mixed[1].outputs.embedding, first)
        torch.testing.assert_close(mixed[0].outputs.embedding, want["projected"][1], atol=1e-5, rtol=1e-5)
        mixed[0].outputs.embedding.zero_()  # the caller's copy: the cache and the other result keep theirs
        assert mixed[2].outputs.embedding.abs().max() > 0
        assert torch.equal(llm.embed([images[1]])[0].outputs.embedding, mixed[2].outputs.embedding)
        # another pooling is another entry: it runs
        llm.embed([images[0]], pooling="qformer")
        assert batch_sizes == [1, 1, 1]
        cache = llm.llm_engine.embedding_cache
        assert cache.num_hits >= 3 and len(cache) == 3
    finally:
        handle.remove()


def test_concurrent_calls_run_as_one_batch_and_a_bad_one_fails_alone(model_dir, expected):
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=8)
    images, want = expected
    vision = llm.llm_engine.runner.model.vision_model
    batch_sizes = []
    handle = vision.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        results = llm.llm_engine.embed_many([([images[0], images[1]], None), (["a text"], None),
                                             ([images[2]], "projected"), ([images[3]], "sideways")])
    finally:
        handle.remove()
    assert batch_sizes == [3]  # the two good "projected" calls: one forward
    assert isinstance(results[1], ValueError) and "text-only inputs cannot be embedded" in str(results[1])
    assert isinstance(results[3], ValueError) and "unknown pooling 'sideways'" in str(results[3])
    got = torch.stack(results[0] + results[2])
    torch.testing.assert_close(got, want["projected"][:3], atol=1e-5, rtol=1e-5)
