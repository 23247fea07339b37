"""LLM.embed and LLM.score on a stage-1 export (Blip2ForImageTextRetrieval) against transformers' own class on the
same checkpoint: its normalised ITC embeddings, ITC logits and ITM probabilities, within 1e-5 in float32; and
images kept between calls (the embedding cache), counted on the real ViT with a forward hook."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Blip2ForImageTextRetrieval, BlipImageProcessorPil

from fovea import LLM
from tests.training.tiny import qformer_tokenizer, randomize_, tiny_config

TEXTS = ["two small red circles", "one large blue square on a white background", "three green triangles"]


def make_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (35, 29, 3), dtype=np.uint8))


IMAGES = [make_image(i) for i in range(3)]


def build_stage1_export(folder):
    """A tiny Blip2ForImageTextRetrieval saved as `fovea train stage1` exports one (tokenizer, image processor)."""
    config = tiny_config(image_size=32, patch_size=8)
    config.architectures = ["Blip2ForImageTextRetrieval"]
    model = Blip2ForImageTextRetrieval(config).eval()
    randomize_(model, seed=3)
    model.save_pretrained(folder)
    qformer_tokenizer().save_pretrained(folder)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_stage1_export(tmp_path_factory.mktemp("retrieval"))


@pytest.fixture(scope="module")
def hf(model_dir):
    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = BlipImageProcessorPil.from_pretrained(model_dir)(IMAGES, return_tensors="pt").pixel_values
    text = qformer_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        itc = model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                    use_image_text_matching_head=False)
        itm = model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                    use_image_text_matching_head=True).logits_per_image.softmax(dim=-1)[:, 1]
    return itc, itm


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_num_seqs=2)  # three inputs: two batches


def test_embeddings_equal_transformers(llm, hf):
    itc, _ = hf
    # images and texts mixed in one call, texts as strings and as prompts
    inputs = [IMAGES[0], TEXTS[0], {"prompt": "", "multi_modal_data": {"image": IMAGES[1]}}, {"prompt": TEXTS[1]},
              TEXTS[2], IMAGES[2]]
    got = [o.outputs.embedding for o in llm.embed(inputs)]
    images, texts = torch.stack([got[0], got[2], got[5]]), torch.cat([got[1], got[3], got[4]])
    assert images.shape == itc.image_embeds.shape and texts.shape == itc.text_embeds.shape
    torch.testing.assert_close(images, itc.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(texts, itc.text_embeds, atol=1e-5, rtol=1e-5)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3, 4), atol=1e-5)


def test_itc_scores_equal_transformers_logits(llm, hf):
    itc, _ = hf
    pairs = [(i, j) for i in range(3) for j in range(3)]
    outs = llm.score([IMAGES[i] for i, _ in pairs], [TEXTS[j] for _, j in pairs], method="itc")
    got = torch.tensor([o.outputs.score for o in outs]).view(3, 3)
    torch.testing.assert_close(got, itc.logits_per_image, atol=1e-5, rtol=1e-5)
    assert itc.logits_per_image.std() > 1e-2


def test_itm_scores_equal_transformers_probabilities(llm, hf):
    _, itm = hf
    got = torch.tensor([o.outputs.score for o in llm.score(IMAGES, TEXTS, method="itm")])
    torch.testing.assert_close(got, itm, atol=1e-5, rtol=1e-5)
    assert itm.std() > 1e-3


def test_one_image_scores_against_many_texts(llm):
    one = [o.outputs.score for o in llm.score(IMAGES[1], TEXTS, method="itm")]
    each = [llm.score(IMAGES[1], text, method="itm")[0].outputs.score for text in TEXTS]
    np.testing.assert_allclose(one, each, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda llm: llm.embed([IMAGES[0]], pooling="projected"), "unknown pooling 'projected'.*offers itc"),
    (lambda llm: llm.embed([{"prompt": "two", "multi_modal_data": {"image": IMAGES[0]}}]), "input 0: give a text"),
    (lambda llm: llm.embed([" ".join(["circle"] * 40)]), "input 0: the text is .* tokens; this model reads at most 32"),
    (lambda llm: llm.score(IMAGES, TEXTS, method="cosine"), "unknown score method 'cosine'; choose one of itc, itm"),
    (lambda llm: llm.score(IMAGES[:2], TEXTS, method="itc"), "2 images and 3 texts"),
    (lambda llm: llm.generate("a photo of"), "Blip2ForImageTextRetrieval.*does not generate"),
])
def test_bad_calls_are_clear_errors(llm, call, message):
    with pytest.raises(ValueError, match=message):
        call(llm)


def _count_vision_runs(llm):
    """The images each forward of the real ViT ran, recorded by a forward hook; remove the handle after."""
    batch_sizes = []
    vision = llm._retrieval.scorer.model.vision_model
    return batch_sizes, vision.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))


def test_scores_read_images_from_the_embedding_cache(model_dir, hf):
    itc, itm = hf
    cold = LLM(str(model_dir), max_num_seqs=2)
    cold_itc = [o.outputs.score for o in cold.score(IMAGES, TEXTS, method="itc")]
    cold_itm = [o.outputs.score for o in cold.score(IMAGES, TEXTS, method="itm")]
    llm = LLM(str(model_dir), max_num_seqs=2)
    batch_sizes, handle = _count_vision_runs(llm)
    try:
        embedded = [o.outputs.embedding for o in llm.embed(IMAGES)]
        assert batch_sizes == [2, 1]
        # a later ITC score of the same images (other objects, same content) runs no ViT: the embed's entries
        copies = [image.copy() for image in IMAGES]
        warm_itc = [o.outputs.score for o in llm.score(copies, TEXTS, method="itc")]
        assert batch_sizes == [2, 1]
        np.testing.assert_allclose(warm_itc, cold_itc, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(warm_itc), itc.logits_per_image.diagonal(), atol=1e-5, rtol=1e-5)
        # ITM reads the ViT's output, another entry: encoded once, then cached for the next ITM score
        warm_itm = [o.outputs.score for o in llm.score(IMAGES, TEXTS, method="itm")]
        assert batch_sizes == [2, 1, 2, 1]
        again_itm = [o.outputs.score for o in llm.score(IMAGES[::-1], TEXTS[::-1], method="itm")]
        assert batch_sizes == [2, 1, 2, 1]
        np.testing.assert_allclose(warm_itm, cold_itm, rtol=0, atol=1e-6)
        np.testing.assert_allclose(again_itm[::-1], warm_itm, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(warm_itm), itm, atol=1e-5, rtol=1e-5)
        # and a later embed is served from the entries, equal to the first
        assert all(torch.equal(a.outputs.embedding, b) for a, b in zip(llm.embed(IMAGES), embedded))
        assert batch_sizes == [2, 1, 2, 1]
    finally:
        handle.remove()


def test_a_cache_too_small_to_keep_an_image_encodes_it_again(model_dir):
    # the cache is what saves the work: with room for nothing the same calls run the ViT each time
    llm = LLM(str(model_dir), max_num_seqs=2, encoder_cache_size=1)
    batch_sizes, handle = _count_vision_runs(llm)
    try:
        llm.embed(IMAGES[:1])
        llm.score(IMAGES[0], TEXTS, method="itc")  # one image against three texts: encoded once
        assert batch_sizes == [1, 1] and len(llm._retrieval.embedding_cache) == 0
    finally:
        handle.remove()
