"""LLaVA-NeXT's anyres features and placeholder counts against transformers, its checkpoint layouts, its refusals,
and its worst case for memory profiling."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fovea.engine.input_processor import profile_mm_features
from fovea.models.llava_next import LlavaNextForConditionalGeneration
from fovea.models.weights import load_weights
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from tests.e2e.blip2_cases import make_image
from tests.oracle.llava_next import build_tiny_llava_next, hf_image_embeds, hf_inputs, hf_processor

# (width, height): every grid of the tiny pinpoints, both unpadding directions, 1 pixel, exactly a pinpoint
SIZES = [(64, 48), (17, 95), (95, 17), (200, 121), (8, 5), (1, 1), (24, 24), (48, 48), (48, 24), (24, 72), (3, 100),
         (100, 3), (41, 40), (75, 61), (333, 250)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_llava_next(tmp_path_factory.mktemp("llava_next_model"), seed=2)


def fovea_model(model_dir):
    model = LlavaNextForConditionalGeneration(transformers.AutoConfig.from_pretrained(model_dir)).eval()
    load_weights(model.requires_grad_(False), model_dir)
    return model


def fovea_processor(model_dir):
    ctx = InputProcessingContext(str(model_dir), transformers.AutoConfig.from_pretrained(model_dir),
                                 transformers.AutoTokenizer.from_pretrained(model_dir))
    return MULTIMODAL_REGISTRY.create_processor(LlavaNextForConditionalGeneration, ctx)


def test_placeholder_counts_equal_transformers_processor(ckpt):
    info = fovea_processor(ckpt).info
    hf = hf_processor(str(ckpt))
    for width, height in SIZES + [(w, h) for w in range(1, 80, 7) for h in range(1, 80, 11)]:
        expected = hf._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
        assert info.get_num_image_tokens((height, width)) == expected, (width, height)
    for width, height in SIZES[:6]:  # and the processor's own expansion of a prompt
        expanded = hf_inputs(ckpt, "<image>", [make_image(0, (width, height))])["input_ids"].tolist()
        assert expanded.count(info.get_image_token_id()) == info.get_num_image_tokens((height, width))


def test_image_features_equal_transformers(ckpt):
    """All images in one call (their tiles one batch through the tower), each equal to transformers' packing."""
    model, processor = fovea_model(ckpt), fovea_processor(ckpt)
    images = [make_image(i, size) for i, size in enumerate(SIZES)]
    processed = processor.info.image_processor(images)
    with torch.no_grad():
        ours = model.embed_multimodal(**processed)
    for image, got in zip(images, ours):
        expected = hf_image_embeds(ckpt, image)
        assert got.shape == expected.shape == (processor.info.get_num_image_tokens((image.height, image.width)), 64)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # pre-computed embeddings come back as given, split per image
    embeds = [torch.randn(n, 64) for n in (36, 88, 52)]
    back = model.embed_multimodal(image_embeds=torch.cat(embeds), num_image_tokens=torch.tensor([36, 88, 52]))
    assert all(torch.equal(a, b) for a, b in zip(back, embeds))


def test_transformers_5_module_names_load(ckpt, tmp_path):
    """transformers 5.23 saves `image_newline` / `vision_tower.` / `language_model.model.`; its module names
    (`model.image_newline`, `model.vision_tower.`, `model.language_model.`, `lm_head.`) load too."""
    reference = fovea_model(ckpt).state_dict()
    tensors = load_file(str(ckpt / "model.safetensors"))

    def rename(name):
        if name.startswith("language_model.lm_head"):
            return "lm_head.weight"
        return "model." + name.replace("language_model.model.", "language_model.", 1)

    for f in ckpt.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file({rename(n): t for n, t in tensors.items()}, str(tmp_path / "model.safetensors"))
    assert "model.image_newline" in load_file(str(tmp_path / "model.safetensors"))
    loaded = fovea_model(tmp_path).state_dict()
    assert loaded.keys() == reference.keys() and "image_newline" in loaded
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)
    del tensors["image_newline"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="image_newline"):
        fovea_model(tmp_path)


def test_memory_profile_uses_the_image_with_most_tokens(ckpt):
    processor = fovea_processor(ckpt)
    # the 2x2 grid of a 48 x 48 image: 16 base + 8 rows of 8 features and a newline
    assert processor.info.get_image_size_with_most_features() == (48, 48)
    assert processor.info.get_mm_max_tokens_per_item(256, {"image": 1}) == {"image": 88}
    features = profile_mm_features(processor, 256, 200, {"image": 88}, {"image": 5})
    assert [f.length for f in features] == [88, 88]  # as many as a 200-token step holds
    assert all(tuple(f.data["pixel_values"].shape) == (5, 3, 24, 24) for f in features)
    assert all(f.data["image_sizes"].tolist() == [[48, 48]] for f in features)


def test_refusals_are_named(ckpt, tmp_path):
    config = transformers.AutoConfig.from_pretrained(ckpt)
    config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="LLaVA-NeXT runs vision_feature_select_strategy 'default' only"):
        LlavaNextForConditionalGeneration(config)
    config = transformers.AutoConfig.from_pretrained(ckpt)
    config.image_grid_pinpoints = [[24, 48], [48, 30]]
    with pytest.raises(ValueError, match=r"\[\[48, 30\]\] are not whole numbers of 24-pixel tiles"):
        LlavaNextForConditionalGeneration(config)
    # the processor's pinpoints must be the model's, or the placeholders would not match the features
    for f in ckpt.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    processor_config["image_processor"]["image_grid_pinpoints"] = [[24, 48], [48, 24]]
    (tmp_path / "processor_config.json").write_text(json.dumps(processor_config))
    with pytest.raises(ValueError, match=r"image_grid_pinpoints \[\[24, 48\], \[48, 24\]\] differ from the model"):
        fovea_processor(tmp_path).info.image_processor


def test_real_tile_size_counts_and_features_equal_transformers(tmp_path):
    """llava-hf's LLaVA-1.6 image geometry (336-pixel tiles of 14-pixel patches, its default pinpoints; a narrow
    tower): placeholder counts equal LlavaNextProcessor's over many sizes, up to 2,928 for a 672 x 672 image, and
    the packed features of a few large images equal transformers'."""
    ckpt = build_tiny_llava_next(tmp_path, seed=4, image_size=336, patch_size=14,
                                 image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    processor, hf = fovea_processor(ckpt), hf_processor(str(ckpt))
    info = processor.info
    sizes = [(h, w) for h in (1, 57, 300, 336, 480, 672, 799, 1008, 1500, 4000) for w in (1, 90, 336, 640, 673, 2000)]
    for height, width in sizes:
        expected = hf._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
        assert info.get_num_image_tokens((height, width)) == expected, (height, width)
    assert info.get_image_size_with_most_features() == (672, 672) and info.get_num_image_tokens() == 2928
    model = fovea_model(ckpt)
    images = [make_image(1, (1000, 700)), make_image(2, (300, 1200)), make_image(3, (2000, 500))]
    with torch.no_grad():
        ours = model.embed_multimodal(**info.image_processor(images))
    for image, got in zip(images, ours):
        torch.testing.assert_close(got, hf_image_embeds(ckpt, image), rtol=0, atol=1e-5)
