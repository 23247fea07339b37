"""LLaVA's checkpoint layouts, its vision-feature options, and its worst case for memory profiling."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fovea.engine.input_processor import profile_mm_features
from fovea.models.clip import CLIPVisionTower, feature_layer_indices
from fovea.models.llava import LlavaForConditionalGeneration
from fovea.models.weights import load_weights
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from tests.oracle.llava import build_tiny_llava, hf_image_embeds, hf_inputs
from tests.e2e.blip2_cases import make_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava_model"), seed=2, vision_layers=4)


def fovea_model(model_dir):
    model = LlavaForConditionalGeneration(transformers.AutoConfig.from_pretrained(model_dir)).eval()
    load_weights(model.requires_grad_(False), model_dir)
    return model


def test_image_features_equal_transformers_and_unused_layers_are_not_built(ckpt):
    model = fovea_model(ckpt)
    assert len(model.vision_tower.encoder.layers) == 3  # feature layer -2 of 4: the last block never runs
    image = make_image(3, (50, 70))
    with torch.no_grad():
        (ours,) = model.embed_multimodal(pixel_values=hf_inputs(ckpt, "<image>", [image])["pixel_values"])
    torch.testing.assert_close(ours, hf_image_embeds(ckpt, image), rtol=0, atol=1e-5)


def test_every_checkpoint_layout_loads(ckpt, tmp_path):
    """transformers 5.23 saves `vision_tower.` / `language_model.model.`; its module names
    (`model.vision_tower.`, `model.language_model.`, `lm_head.`) and llava-hf's `vision_tower.vision_model.` load too."""
    reference = fovea_model(ckpt).state_dict()
    tensors = load_file(str(ckpt / "model.safetensors"))
    renames = {
        "transformers 5 modules": lambda n: ("model." + n.replace("language_model.model.", "language_model.", 1)
                                             if not n.startswith("language_model.lm_head") else "lm_head.weight"),
        "llava-hf": lambda n: n.replace("vision_tower.", "vision_tower.vision_model.", 1),
    }
    for layout, rename in renames.items():
        model_dir = tmp_path / layout.replace(" ", "_")
        model_dir.mkdir()
        for f in ckpt.iterdir():
            if f.name != "model.safetensors":
                (model_dir / f.name).write_bytes(f.read_bytes())
        save_file({rename(n): t for n, t in tensors.items()}, str(model_dir / "model.safetensors"))
        loaded = fovea_model(model_dir).state_dict()
        assert loaded.keys() == reference.keys()
        for name in reference:
            assert torch.equal(loaded[name], reference[name]), (layout, name)
    del tensors["multi_modal_projector.linear_2.bias"]
    save_file(tensors, str(tmp_path / "llava-hf" / "model.safetensors"))
    with pytest.raises(ValueError, match="multi_modal_projector.linear_2.bias"):
        fovea_model(tmp_path / "llava-hf")


def test_feature_layers_and_strategy_are_checked(ckpt):
    assert feature_layer_indices(-2, 24) == [23]
    assert feature_layer_indices([0, -1, 5], 24) == [0, 24, 5]
    with pytest.raises(ValueError, match=r"vision_feature_layer 25 is out of range: .* use -25 .. 24"):
        feature_layer_indices([-1, 25], 24)
    config = transformers.AutoConfig.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'cls' is not one of 'default'"):
        CLIPVisionTower(config.vision_config, -2, "cls")  # transformers' config refuses it too
    config = transformers.AutoConfig.from_pretrained(ckpt)
    config.text_config.model_type = "gemma"
    with pytest.raises(ValueError, match=r"runs \['llama', 'mistral', 'qwen2'\] language models, not 'gemma'"):
        LlavaForConditionalGeneration(config)


def test_memory_profile_uses_full_size_images(ckpt):
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    ctx = InputProcessingContext(str(ckpt), transformers.AutoConfig.from_pretrained(ckpt), tokenizer)
    processor = MULTIMODAL_REGISTRY.create_processor(LlavaForConditionalGeneration, ctx)
    features = profile_mm_features(processor, 256, 64, {"image": 25}, {"image": 5})
    assert [f.length for f in features] == [25, 25]  # as many as a 64-token step holds
    assert all(tuple(f.data["pixel_values"].shape) == (1, 3, 30, 30) for f in features)
