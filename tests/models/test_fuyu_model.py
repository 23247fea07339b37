"""Fuyu's image processor and prompt framing against transformers', its checkpoint layouts, and its worst case for
memory profiling.

transformers 5.23's `FuyuProcessor` cannot run with `FuyuImageProcessorPil` (see tests/oracle/fuyu.py), so the
image processor is compared two ways: against `FuyuImageProcessorPil`'s own steps run on numpy data (its
preprocess, then the crop to whole patches and `patchify_image` that `FuyuProcessor` applies), and against the
whole `FuyuProcessor` with `patchify_image` handed numpy arrays.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from fovea.engine.input_processor import profile_mm_features
from fovea.models.fuyu import FuyuForCausalLM
from fovea.models.weights import load_weights
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.processors import FuyuImageProcessor, get_image_processor
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from tests.e2e.blip2_cases import make_image
from tests.oracle.fuyu import build_tiny_fuyu, hf_inputs, hf_processor

# (width, height): smaller than size, larger in one edge or both, exactly size, one patch, whole patches, thin
SIZES = [(95, 47), (17, 200), (400, 130), (8, 5), (210, 150), (30, 60), (1, 1), (211, 151), (640, 31), (5, 500)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_fuyu(tmp_path_factory.mktemp("fuyu_model"), seed=3)


def processor_of(ckpt):
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    ctx = InputProcessingContext(str(ckpt), transformers.AutoConfig.from_pretrained(ckpt), tokenizer)
    return MULTIMODAL_REGISTRY.create_processor(FuyuForCausalLM, ctx)


def transformers_patches(image_processor, image: Image.Image) -> np.ndarray:
    """FuyuImageProcessorPil's preprocess on numpy data, then FuyuProcessor's crop to the whole patches the
    unpadded image covers and `patchify_image`: [num_patches, 2700]."""
    out = image_processor(image, return_tensors=None)
    padded = out["images"][0][0]  # (3, size_h, size_w) float32, resized, padded and normalised
    patch = image_processor.patch_size
    new_h = min(padded.shape[1], math.ceil(out["image_unpadded_heights"][0][0] / patch.height) * patch.height)
    new_w = min(padded.shape[2], math.ceil(out["image_unpadded_widths"][0][0] / patch.width) * patch.width)
    return image_processor.patchify_image(padded[:, :new_h, :new_w], patch_size=patch)


@pytest.mark.parametrize("size", SIZES)
def test_image_processor_equals_transformers(ckpt, size):
    ours = get_image_processor(ckpt)
    assert isinstance(ours, FuyuImageProcessor)
    reference = transformers.FuyuImageProcessorPil.from_pretrained(ckpt)
    image = make_image(sum(size), size)
    out = ours([image])
    expected = transformers_patches(reference, image)
    rows, cols = out["image_grid"][0].tolist()
    assert rows * cols == expected.shape[0] and out["pixel_values"].shape == (rows * cols, 2700)
    assert torch.equal(out["pixel_values"], torch.from_numpy(expected))
    # the same through the whole FuyuProcessor (numpy patchify)
    through_processor = hf_inputs(ckpt, "x", [image])["pixel_values"]
    assert torch.equal(out["pixel_values"], through_processor)


def test_image_processor_options_and_modes(ckpt):
    # a grey or transparent image becomes RGB first (transformers' Fuyu would pass 1 or 4 channels on and fail)
    grey = Image.fromarray(np.arange(40 * 70, dtype=np.uint32).reshape(40, 70).astype(np.uint8), mode="L")
    ours = get_image_processor(ckpt)
    assert torch.equal(ours([grey])["pixel_values"], ours([grey.convert("RGB")])["pixel_values"])
    with pytest.raises(ValueError, match=r"size 100 x 210 must be whole patches of 30 x 30"):
        FuyuImageProcessor(size={"height": 100, "width": 210})
    with pytest.raises(ValueError, match=r"do_pad=false is not supported"):
        FuyuImageProcessor(do_pad=False)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['crop_size'\]"):
        FuyuImageProcessor.from_dict({"crop_size": 3})
    with pytest.raises(ValueError, match=r"1 x 10000 pixels shrunk to fit 150 x 210 would be 0 x 210"):
        ours.grid_size(1, 10000)


@pytest.mark.parametrize("size", [(95, 47), (400, 130), (8, 5)])
def test_prompt_framing_equals_transformers(ckpt, size):
    """|SPEAKER| * columns + |NEWLINE| per row, <s>, the text without BOS, <0x04>; only the |SPEAKER|s take features."""
    processor = processor_of(ckpt)
    image = make_image(1, size)
    text = "What colour is the car?\n"
    inputs = processor.apply(text, {"image": [image]}, {"image": ["h"]})
    reference = hf_inputs(ckpt, text, [image])["input_ids"].tolist()
    assert inputs.prompt_token_ids == reference
    (feature,) = inputs.mm_features
    vocab = processor.info.get_tokenizer().get_vocab()
    rows, cols = feature.data["image_grid"][0].tolist()
    assert (feature.offset, feature.length) == (0, rows * (cols + 1) + 1)
    assert feature.is_embed == ([True] * cols + [False]) * rows + [False]
    assert [t for t, e in zip(reference, feature.is_embed) if e] == [vocab["|SPEAKER|"]] * (rows * cols)
    assert reference[feature.length - 1] == vocab["<s>"]
    # token ids are the text's tokens: the same framing
    text_ids = processor.info.get_tokenizer()(text, add_special_tokens=False).input_ids
    assert processor.apply(text_ids, {"image": [image]}, {"image": ["h"]}).prompt_token_ids == reference
    # without an image: the tokenizer's own encoding (BOS, no <0x04>), as FuyuProcessor
    assert processor.apply(text, {}, {}).prompt_token_ids == hf_inputs(ckpt, text, [])["input_ids"].tolist()


def test_stray_image_tokens_and_embeddings_are_refused(ckpt):
    processor = processor_of(ckpt)
    with pytest.raises(ValueError, match=r"holds 2 \|SPEAKER\| image token\(s\) \(id \d+\) that no image fills"):
        processor.apply("|SPEAKER||SPEAKER| hi", {"image": [make_image(0, (40, 40))]}, {"image": ["h"]})
    with pytest.raises(ValueError, match=r"holds 1 \|SPEAKER\|"):
        processor.apply("hi |SPEAKER|", {}, {})
    with pytest.raises(ValueError, match=r"Fuyu cannot take torch.Tensor as an image: it has no vision tower"):
        processor.apply("hi", {"image": [torch.zeros(4, 64)]}, {"image": ["h"]})


def fovea_model(model_dir):
    model = FuyuForCausalLM(transformers.AutoConfig.from_pretrained(model_dir)).eval()
    load_weights(model.requires_grad_(False), model_dir)
    return model


def test_both_checkpoint_layouts_load(ckpt, tmp_path):
    """transformers 5.23 saves adept/fuyu-8b's names (`vision_embed_tokens.`, `language_model.model.`,
    `language_model.lm_head.`); its module names (`model.vision_embed_tokens.`, `model.language_model.`,
    `lm_head.`) load too, and a missing tensor is named."""
    reference = fovea_model(ckpt).state_dict()
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert "vision_embed_tokens.weight" in tensors and "language_model.lm_head.weight" in tensors

    def module_name(name: str) -> str:
        if name.startswith("language_model.lm_head."):
            return name.replace("language_model.", "", 1)
        if name.startswith("language_model.model."):
            return "model.language_model." + name[len("language_model.model."):]
        return "model." + name

    for f in ckpt.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file({module_name(n): t for n, t in tensors.items()}, str(tmp_path / "model.safetensors"))
    loaded = fovea_model(tmp_path).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[n], reference[n]) for n in reference)
    del tensors["language_model.model.layers.1.self_attn.q_layernorm.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.self_attn.q_layernorm.bias"):
        fovea_model(tmp_path)


def test_image_embeddings_equal_transformers(ckpt):
    model = fovea_model(ckpt)
    image = make_image(2, (130, 70))
    inputs = hf_inputs(ckpt, "x", [image])
    ours = get_image_processor(ckpt)([image])
    with torch.no_grad():
        (embeds,) = model.embed_multimodal(**ours)
        reference = transformers.FuyuForCausalLM.from_pretrained(ckpt).eval().model.get_image_features(
            inputs["pixel_values"]).last_hidden_state
    torch.testing.assert_close(embeds, reference, rtol=0, atol=1e-6)


def test_memory_profile_uses_the_largest_image(ckpt):
    processor = processor_of(ckpt)
    assert processor.info.get_mm_max_tokens_per_item(512, {"image": 1}) == {"image": 5 * 7}
    (feature,) = profile_mm_features(processor, 256, 64, {"image": 35}, {"image": 1})
    assert feature.data["image_grid"].tolist() == [[5, 7]]  # size 150 x 210: 5 rows of 7 patches
    assert tuple(feature.data["pixel_values"].shape) == (35, 2700)
    assert feature.length == 5 * 8 + 1 and feature.num_embeds == 35


def test_real_size_token_counts_and_pixels_equal_transformers():
    """At transformers' defaults (adept/fuyu-8b's: at most 1080 x 1920, 30 x 30 patches): the placeholder count
    equals `FuyuProcessor._get_num_multimodal_tokens` (patches plus a newline per row), and a large image's patches
    equal `FuyuImageProcessorPil`'s."""
    from tests.oracle.fuyu import build_fuyu_tokenizer

    reference = transformers.FuyuImageProcessorPil()
    counter = transformers.FuyuProcessor(image_processor=reference, tokenizer=build_fuyu_tokenizer())
    ours = FuyuImageProcessor()
    for height, width in [(1080, 1920), (2000, 1300), (1081, 1920), (47, 95), (5000, 31), (700, 4000)]:
        rows, cols = ours.grid_size(height, width)
        expected = counter._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
        assert rows * (cols + 1) == expected, (height, width)
    assert ours.grid_size(1080, 1920) == (36, 64)  # the worst case memory profiling uses: 2,340 placeholders
    image = make_image(11, (1300, 2000))  # (width, height): shrunk to 702 x 1080
    out = ours([image])
    assert out["image_grid"].tolist() == [[36, 24]]
    assert torch.equal(out["pixel_values"], torch.from_numpy(transformers_patches(reference, image)))
