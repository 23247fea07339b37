"""fovea's anyres preprocessing (LLaVA-NeXT's) against transformers' `LlavaNextImageProcessorPil` (the oracle)."""
import pytest
import torch
from transformers import LlavaNextImageProcessorPil
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution as hf_best_resolution

from fovea.multimodal.processors import LlavaNextImageProcessor, get_image_processor
from fovea.multimodal.processors.llava_next import fit_size, select_best_resolution
from tests.multimodal.processors.test_blip import MODES, make_image

# (width, height): square, wide, tall, past every pinpoint's ratio both ways, 1x1, exactly a pinpoint, odd sizes
SIZES = [(1, 1), (24, 24), (48, 24), (33, 17), (17, 95), (200, 121), (7, 300), (300, 7), (71, 70), (5, 8),
         (97, 29), (640, 481)]
TINY_PINPOINTS = [[24, 48], [48, 24], [48, 48], [72, 24], [24, 72]]
OPTIONS = {
    "llava-next tiny": dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                            image_grid_pinpoints=TINY_PINPOINTS),
    # tiles at llava-hf's real sizes: 336-pixel tiles, the default pinpoints
    "llava-1.6": dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    "odd grid, bilinear, no normalise": dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                             image_grid_pinpoints=[[16, 16], [32, 80], [48, 16], [64, 64]],
                                             resample=2, do_normalize=False),
    "fixed base size": dict(size={"height": 20, "width": 20}, crop_size={"height": 20, "width": 20},
                            image_grid_pinpoints=[[40, 20], [20, 60], [40, 40]]),
}


def oracle(images, options):
    """Per image, its tiles [num_tiles, 3, S, S] (transformers pads every image to the most tiles of a batch)."""
    out = LlavaNextImageProcessorPil(**options)(images, return_tensors="pt")
    counts = [LlavaNextImageProcessor(**options).num_tiles(tuple(s.tolist())) for s in out["image_sizes"]]
    return [pv[:n] for pv, n in zip(out["pixel_values"], counts)], out["image_sizes"]


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
def test_pixels_equal_transformers(options):
    sizes = SIZES if options != "llava-1.6" else [(1, 1), (640, 481), (97, 29), (300, 700)]  # 336-px tiles: slow
    images = [make_image("RGB", w, h, seed=w * 7 + h) for w, h in sizes]
    expected, expected_sizes = oracle(images, OPTIONS[options])
    got = LlavaNextImageProcessor(**OPTIONS[options])(images)
    assert got["pixel_values"].dtype == torch.float32
    assert torch.equal(got["image_sizes"], expected_sizes)
    assert torch.equal(got["pixel_values"], torch.cat(expected))
    assert {len(e) for e in expected} >= {3, 4} if options == "llava-next tiny" else True  # several grids


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_equals_transformers(mode):
    images = [make_image(mode, 45, 37, seed=3), make_image(mode, 20, 52, seed=4)]
    expected, _ = oracle(images, OPTIONS["llava-next tiny"])
    assert torch.equal(LlavaNextImageProcessor(**OPTIONS["llava-next tiny"])(images)["pixel_values"],
                       torch.cat(expected))


def test_best_resolution_and_fit_equal_transformers():
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008], [336, 336]]
    for height in (1, 2, 3, 7, 100, 335, 336, 337, 500, 671, 672, 1000, 1008, 3000):
        for width in (1, 5, 99, 336, 400, 672, 673, 1500):
            best = select_best_resolution((height, width), pinpoints)
            assert best == hf_best_resolution((height, width), pinpoints)
            array = torch.zeros(3, height, width).numpy()
            assert fit_size((height, width), best) == get_patch_output_size(array, best, "channels_first")


def test_loaded_from_a_saved_processor(tmp_path):
    options = dict(OPTIONS["odd grid, bilinear, no normalise"], image_mean=[0.5, 0.4, 0.3])
    LlavaNextImageProcessorPil(**options).save_pretrained(str(tmp_path))
    processor = get_image_processor(tmp_path)
    assert isinstance(processor, LlavaNextImageProcessor)
    assert processor.image_grid_pinpoints == ((16, 16), (32, 80), (48, 16), (64, 64))
    image = make_image("RGBA", 61, 40, seed=9)
    (expected,), _ = oracle([image], options)
    assert torch.equal(processor([image])["pixel_values"], expected)
    assert LlavaNextImageProcessor.from_dict(processor.to_dict()).to_dict() == processor.to_dict()
    # llava-hf's released LLaVA-1.6 configs carry an option transformers does not read
    released = dict(processor.to_dict(), aspect_ratio_setting="anyres", do_pad=True)
    assert LlavaNextImageProcessor.from_dict(released).to_dict() == processor.to_dict()


def test_bad_pinpoints_are_named():
    with pytest.raises(ValueError, match=r"\[\[24, 50\]\] are not whole numbers of 24-pixel tiles"):
        LlavaNextImageProcessor(crop_size=24, image_grid_pinpoints=[[24, 48], [24, 50]])
    for bad in ([], [[24]], [[24, 0]], "24x48", [[24.0, 48]]):
        with pytest.raises(ValueError, match="image_grid_pinpoints must be a non-empty list of"):
            LlavaNextImageProcessor(crop_size=24, image_grid_pinpoints=bad)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['tiles'\]"):
        LlavaNextImageProcessor.from_dict({"tiles": 3})
