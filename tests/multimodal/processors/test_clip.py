"""fovea's CLIP preprocessing (LLaVA-1.5's) against transformers' `CLIPImageProcessorPil` (the oracle)."""
import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessorPil

from fovea.multimodal.processors import CLIPImageProcessor, get_image_processor
from tests.multimodal.processors.test_blip import MODES, make_image

SIZES = [(1, 1), (7, 300), (300, 7), (336, 336), (640, 481), (33, 17), (35, 34)]  # (width, height)
OPTIONS = {
    "llava-1.5": dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
    "odd crop": dict(size={"shortest_edge": 29}, crop_size={"height": 17, "width": 23}),
    # crop larger than the resized image: transformers pads with zeros, centred, before cropping
    "crop pads": dict(size={"shortest_edge": 12}, crop_size={"height": 21, "width": 16}),
    "fixed size, no crop": dict(size={"height": 19, "width": 27}, do_center_crop=False),
    "bilinear, no normalise": dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, resample=2,
                                   do_normalize=False),
    "no rescale": dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_rescale=False,
                       image_mean=[127.0, 120.0, 110.0], image_std=[60.0, 61.0, 62.0]),
}


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("width,height", SIZES)
def test_pixels_equal_transformers(options, width, height):
    images = [make_image("RGB", width, height, seed=width * 7 + height)]
    expected = CLIPImageProcessorPil(**OPTIONS[options])(images, return_tensors="pt")["pixel_values"]
    got = CLIPImageProcessor(**OPTIONS[options])(images)["pixel_values"]
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_equals_transformers(mode):
    images = [make_image(mode, 45, 37, seed=3), make_image(mode, 20, 52, seed=4)]
    options = OPTIONS["llava-1.5"]
    expected = CLIPImageProcessorPil(**options)(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(CLIPImageProcessor(**options)(images)["pixel_values"], expected)


def test_loaded_from_a_saved_processor(tmp_path):
    oracle = CLIPImageProcessorPil(size={"shortest_edge": 26}, crop_size={"height": 26, "width": 22},
                                   image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    oracle.save_pretrained(str(tmp_path))
    processor = get_image_processor(tmp_path)
    assert isinstance(processor, CLIPImageProcessor)
    image = make_image("RGBA", 61, 40, seed=9)
    assert torch.equal(processor([image])["pixel_values"], oracle([image], return_tensors="pt")["pixel_values"])
    assert CLIPImageProcessor.from_dict(processor.to_dict()).to_dict() == processor.to_dict()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['shortest'\]"):
        CLIPImageProcessor.from_dict({"shortest": 3})
    with pytest.raises(ValueError, match="do_pad=true is not supported"):
        CLIPImageProcessor.from_dict({"do_pad": True})
    with pytest.raises(ValueError, match="crop_size must be"):
        CLIPImageProcessor(crop_size={"shortest_edge": 4})
    with pytest.raises(ValueError, match="differ in size"):
        CLIPImageProcessor(size={"shortest_edge": 8}, do_center_crop=False)(
            [make_image("RGB", 8, 16), make_image("RGB", 8, 8)])
    assert np.isfinite(CLIPImageProcessor()([make_image("RGB", 5, 5)])["pixel_values"].numpy()).all()
