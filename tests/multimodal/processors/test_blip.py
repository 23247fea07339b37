"""fovea's BLIP preprocessing against transformers' `BlipImageProcessorPil` (the oracle)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, Blip2Processor, PreTrainedTokenizerFast
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from fovea.multimodal.processors import BlipImageProcessor, get_image_processor, read_image_processor_config

SIZES = [(1, 1), (7, 300), (300, 7), (224, 224), (640, 480), (33, 17)]  # (width, height)


def _rgb(rng, width, height, channels=3):
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def make_image(mode, width, height, seed=0):
    """A deterministic random image of `mode`; the alpha and palette variants cover every branch of
    transformers' convert-to-RGB rule."""
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(_rgb(rng, width, height))
    if mode == "RGBA":  # alpha spans fully transparent to opaque
        return Image.fromarray(_rgb(rng, width, height, 4))
    if mode == "L":
        return Image.fromarray(_rgb(rng, width, height)[..., 0])
    if mode == "LA":
        return Image.fromarray(_rgb(rng, width, height, 4)).convert("LA")
    if mode == "P":
        return Image.fromarray(_rgb(rng, width, height)).quantize(colors=64)
    if mode == "P+index-transparency":  # one palette index transparent (GIF/PNG tRNS as an int)
        image = Image.fromarray(_rgb(rng, width, height)).quantize(colors=64)
        image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    if mode == "P+alpha-table":  # per-palette-entry alpha (PNG tRNS as bytes)
        image = Image.fromarray(_rgb(rng, width, height)).quantize(colors=64)
        image.info["transparency"] = bytes(rng.integers(0, 256, 64, dtype=np.uint8))
        return image
    if mode == "RGB+transparent-colour":  # an RGB PNG whose tRNS names one colour as transparent
        pixels = _rgb(rng, width, height) // 64 * 64  # few colours, so the transparent one occurs
        image = Image.fromarray(pixels)
        image.info["transparency"] = tuple(int(v) for v in pixels[0, 0])
        return image
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), _rgb(rng, width, height, 4).tobytes())
    if mode == "1":
        return Image.fromarray(_rgb(rng, width, height)[..., 0]).convert("1")
    raise AssertionError(mode)


MODES = ["RGB", "RGBA", "L", "LA", "P", "P+index-transparency", "P+alpha-table", "RGB+transparent-colour", "CMYK",
         "1"]


def oracle_pixels(images, **options):
    return BlipImageProcessorPil(**options)(images, return_tensors="pt")["pixel_values"]


def assert_matches(ours, reference):
    assert ours.dtype == torch.float32
    assert ours.shape == reference.shape
    assert (ours - reference.float()).abs().max().item() < 1e-5


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_default_options_match_oracle(mode, width, height):
    image = make_image(mode, width, height)
    assert_matches(BlipImageProcessor()([image])["pixel_values"], oracle_pixels([image]))


OPTION_SETS = [
    dict(size={"height": 224, "width": 224}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    dict(size={"height": 32, "width": 48}, image_mean=0.4, image_std=0.2, resample=Image.Resampling.BILINEAR),
    dict(size=64, resample=Image.Resampling.NEAREST),
    dict(size=(40, 24), resample=Image.Resampling.LANCZOS, rescale_factor=1 / 127.5, image_mean=[1.0, 1.0, 1.0],
         image_std=[1.0, 1.0, 1.0]),
    dict(size={"height": 16, "width": 16}, resample=Image.Resampling.BOX, do_normalize=False),
    dict(size={"height": 16, "width": 20}, resample=Image.Resampling.HAMMING, do_rescale=False),
    dict(size={"height": 16, "width": 16}, do_rescale=False, do_normalize=False),
    dict(size={"height": 50, "width": 30}, do_resize=False),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(sorted(o)))
def test_options_match_oracle_on_a_mixed_batch(options):
    if options.get("do_resize") is False:  # a batch needs one size when nothing resizes
        images = [make_image(mode, 30, 50, seed=i) for i, mode in enumerate(["RGB", "RGBA", "P", "L"])]
    else:
        images = [make_image(mode, w, h, seed=i) for i, (mode, (w, h)) in
                  enumerate(zip(["RGB", "RGBA", "P+index-transparency", "L", "LA"], SIZES[1:]))]
    assert_matches(BlipImageProcessor(**options)(images)["pixel_values"], oracle_pixels(images, **options))


def test_exact_not_just_close():
    image = make_image("RGBA", 123, 77)
    assert torch.equal(BlipImageProcessor()([image])["pixel_values"], oracle_pixels([image]))


def test_without_convert_rgb_takes_rgb_and_rejects_other_modes():
    image = make_image("RGB", 20, 30)
    processor = BlipImageProcessor(do_convert_rgb=False, size=32)
    assert_matches(processor([image])["pixel_values"], oracle_pixels([image], do_convert_rgb=False, size=32))
    with pytest.raises(ValueError, match="mode 'L'"):
        processor([make_image("L", 20, 30)])


def test_unequal_sizes_without_resize_cannot_batch():
    with pytest.raises(ValueError, match="do_resize is off"):
        BlipImageProcessor(do_resize=False)([make_image("RGB", 4, 5), make_image("RGB", 5, 4)])


# -- reading checkpoints ------------------------------------------------------------------------------------

SAVED_OPTIONS = dict(size={"height": 32, "width": 48}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3],
                     resample=Image.Resampling.BILINEAR)
PROBE_IMAGES = [make_image("RGBA", 70, 50, seed=1), make_image("P+alpha-table", 9, 31, seed=2)]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def _assert_loads_like_transformers(model_dir):
    reference = AutoImageProcessor.from_pretrained(model_dir)(PROBE_IMAGES, return_tensors="pt")["pixel_values"]
    assert_matches(BlipImageProcessor.from_pretrained(model_dir)(PROBE_IMAGES)["pixel_values"], reference)
    processor = get_image_processor(model_dir)
    assert isinstance(processor, BlipImageProcessor)
    assert_matches(processor(PROBE_IMAGES)["pixel_values"], reference)


def test_round_trip_image_processor_save_pretrained(tmp_path):
    BlipImageProcessorPil(**SAVED_OPTIONS).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["preprocessor_config.json"]
    _assert_loads_like_transformers(tmp_path)


def test_round_trip_blip2_processor_save_pretrained(tmp_path):
    processor = Blip2Processor(BlipImageProcessorPil(**SAVED_OPTIONS), _tiny_tokenizer(), num_query_tokens=4)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_processor"]["size"] == {"height": 32, "width": 48}  # nested, as transformers 5 writes it
    assert not (tmp_path / "preprocessor_config.json").exists()
    _assert_loads_like_transformers(tmp_path)


def test_nested_processor_config_wins_over_preprocessor_config(tmp_path):
    BlipImageProcessorPil(**SAVED_OPTIONS).save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Blip2Processor", "image_processor": {"image_processor_type": "BlipImageProcessor",
                                                                  "size": {"height": 20, "width": 10}}}))
    assert read_image_processor_config(tmp_path)["size"] == {"height": 20, "width": 10}
    _assert_loads_like_transformers(tmp_path)
    # a processor_config.json without an image_processor entry defers to preprocessor_config.json
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Blip2Processor"}))
    assert read_image_processor_config(tmp_path)["size"] == SAVED_OPTIONS["size"]
    _assert_loads_like_transformers(tmp_path)


def test_legacy_config_with_metadata_and_int_size(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor", "size": 40,
        "do_pad": False, "do_center_crop": None, "crop_size": {"height": 8, "width": 8}, "image_std": [0.3, 0.3, 0.3],
        "return_tensors": "pt", "data_format": "channels_first",
    }))
    _assert_loads_like_transformers(tmp_path)


@pytest.mark.parametrize("nulls", [{"do_normalize": None}, {"do_rescale": None, "rescale_factor": None},
                                   {"do_resize": None, "size": None, "resample": None},
                                   {"do_normalize": False, "image_mean": None, "image_std": None}])
def test_nulls_in_a_config_mean_what_they_mean_to_transformers(tmp_path, nulls):
    # transformers keeps an explicit null (it does not fall back to the class default): a null switch is off
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BlipImageProcessor", "size": 16, "do_resize": True, **nulls}))
    same_size_images = [make_image("RGBA", 16, 16, seed=3), make_image("P", 16, 16, seed=4)]
    reference = AutoImageProcessor.from_pretrained(tmp_path)(same_size_images, return_tensors="pt")["pixel_values"]
    assert_matches(get_image_processor(tmp_path)(same_size_images)["pixel_values"], reference)


@pytest.mark.parametrize("option", ["resample", "size", "rescale_factor", "image_mean"])
def test_null_value_for_a_step_that_is_on_is_an_error(option):
    with pytest.raises(ValueError, match=option):
        BlipImageProcessor.from_dict({option: None})


def test_to_dict_round_trips():
    processor = BlipImageProcessor(**SAVED_OPTIONS)
    assert json.loads(json.dumps(processor.to_dict())) == processor.to_dict()
    assert BlipImageProcessor.from_dict(processor.to_dict()).to_dict() == processor.to_dict()


@pytest.mark.parametrize("config,message", [
    ({"size": 384, "do_center_crop": True, "crop_size": 224}, "do_center_crop"),
    ({"do_pad": True}, "do_pad"),
    ({"size": {"shortest_edge": 224}}, "shortest_edge"),
    ({"size": 224, "default_to_square": False}, "shortest-edge"),
    ({"size": 224, "default_to_square": None}, "shortest-edge"),
    ({"resample": 17}, "resample"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_std": 0.0}, "image_std"),
    ({"do_reduce_labels": True, "foo": 1}, r"\['do_reduce_labels', 'foo'\].*valid options"),
])
def test_bad_options_are_errors_that_name_them(config, message):
    with pytest.raises(ValueError, match=message):
        BlipImageProcessor.from_dict(config)


def test_get_image_processor_errors(tmp_path):
    with pytest.raises(ValueError, match="no image processor config"):
        get_image_processor(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    with pytest.raises(ValueError, match=r"'SiglipImageProcessor'.*BlipImageProcessor"):
        get_image_processor(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        get_image_processor(tmp_path)
