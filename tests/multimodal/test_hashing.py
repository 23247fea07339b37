import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fovea.multimodal.hashing import hash_mm_item
from fovea.multimodal.processors import BlipImageProcessor

OPTIONS = BlipImageProcessor().to_dict()


def random_pixels(height=12, width=17, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def png_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


@pytest.mark.parametrize("channels", [3, 4])
def test_same_pixels_hash_equal_whatever_the_input_kind(tmp_path, channels):
    pixels = random_pixels(channels=channels)
    encoded = png_bytes(Image.fromarray(pixels))
    path = tmp_path / "image.png"
    path.write_bytes(encoded)
    items = [Image.fromarray(pixels), Image.open(path), pixels, encoded, str(path), path,
             "data:image/png;base64," + base64.b64encode(encoded).decode()]
    hashes = {hash_mm_item("image", item, **OPTIONS) for item in items}
    assert len(hashes) == 1
    (digest,) = hashes
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_one_pixel_changed_hashes_differently():
    pixels = random_pixels()
    changed = pixels.copy()
    changed[5, 7, 1] ^= 1
    assert hash_mm_item("image", Image.fromarray(pixels)) != hash_mm_item("image", Image.fromarray(changed))


def test_mode_and_shape_are_part_of_the_content():
    flat = np.zeros((4, 6), np.uint8)
    assert hash_mm_item("image", Image.fromarray(flat)) != hash_mm_item("image", Image.fromarray(flat.reshape(6, 4)))
    assert hash_mm_item("image", Image.fromarray(flat)) != hash_mm_item("image", Image.fromarray(flat).convert("P"))


def test_palette_and_transparency_are_part_of_the_content():
    image = Image.fromarray(random_pixels()).quantize(colors=8)
    other_palette = image.copy()
    other_palette.putpalette(bytes(255 - v for v in image.getpalette()))
    assert np.array_equal(np.asarray(image), np.asarray(other_palette))  # same indices, other colours
    assert hash_mm_item("image", image) != hash_mm_item("image", other_palette)
    transparent = image.copy()
    transparent.info["transparency"] = 2
    alpha_table = image.copy()
    alpha_table.info["transparency"] = bytes([255, 0, 255])
    assert len({hash_mm_item("image", im) for im in (image, transparent, alpha_table)}) == 3


def test_options_are_part_of_the_hash_in_any_order():
    image = Image.fromarray(random_pixels())
    base = hash_mm_item("image", image, **OPTIONS)
    assert hash_mm_item("image", image, **dict(reversed(list(OPTIONS.items())))) == base
    assert hash_mm_item("image", image, **BlipImageProcessor(size=224).to_dict()) != base
    assert hash_mm_item("image", image, **{**OPTIONS, "image_mean": (0.5, 0.5, 0.5)}) != base
    assert hash_mm_item("image", image) != base
    # tuples and lists, numpy and Python scalars, an IntEnum and its int: the same option
    assert (hash_mm_item("image", image, mean=(0.5, 0.25), resample=Image.Resampling.BICUBIC, n=np.int64(3))
            == hash_mm_item("image", image, mean=[0.5, 0.25], resample=3, n=3))


def test_any_option_name_is_allowed():
    pixels = random_pixels()
    assert hash_mm_item("image", pixels, modality="x", item=1) != hash_mm_item("image", pixels)


def test_modality_is_part_of_the_hash():
    pixels = random_pixels()
    assert hash_mm_item("image", pixels) != hash_mm_item("video", pixels[None])
    assert hash_mm_item("video", pixels) != hash_mm_item("audio", pixels)


def test_arrays_and_tensors_hash_dtype_shape_and_bytes():
    values = torch.arange(12, dtype=torch.float32)
    assert hash_mm_item("image_embeds", values.reshape(3, 4)) == hash_mm_item("image_embeds", values.reshape(3, 4))
    assert hash_mm_item("image_embeds", values.reshape(3, 4)) != hash_mm_item("image_embeds", values.reshape(4, 3))
    assert hash_mm_item("image_embeds", values) != hash_mm_item("image_embeds", values.to(torch.bfloat16))
    assert hash_mm_item("image_embeds", values.reshape(3, 4).T) == hash_mm_item("image_embeds",
                                                                              values.reshape(3, 4).T.contiguous())
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    assert hash_mm_item("video", frames) != hash_mm_item("video", frames.astype(np.float32))
    assert hash_mm_item("video", frames) != hash_mm_item("video", frames.reshape(4, 2, 4, 3))
    assert hash_mm_item("image_embeds", torch.zeros(0)) != hash_mm_item("image_embeds", torch.zeros(0, 2))


def test_errors():
    with pytest.raises(ValueError, match="unsupported image input of type int"):
        hash_mm_item("image", 42)
    with pytest.raises(ValueError, match="cannot hash a 'video' item of type str"):
        hash_mm_item("video", "clip.mp4")
    with pytest.raises(ValueError, match="no stable JSON form"):
        hash_mm_item("image", random_pixels(), processor=object())
