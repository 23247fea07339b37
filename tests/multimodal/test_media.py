import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fovea.multimodal.media import load_image, load_images


def random_pixels(height=13, width=21, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def png_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def data_url(data: bytes, mime_type="image/png") -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize("mode,pixels", [("RGB", random_pixels()), ("RGBA", random_pixels(channels=4)),
                                         ("L", random_pixels()[..., 0])])
def test_every_input_kind_gives_the_same_pixels(tmp_path, mode, pixels):
    image = Image.fromarray(pixels)
    encoded = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(encoded)
    inputs = {"pil": image, "array": pixels, "str path": str(path), "Path": path, "bytes": encoded,
              "bytearray": bytearray(encoded), "data URL": data_url(encoded)}
    for kind, item in inputs.items():
        loaded = load_image(item)
        assert loaded.mode == mode, kind
        assert np.array_equal(np.asarray(loaded), pixels), kind


def test_pil_image_is_returned_itself_and_decoded(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(Image.fromarray(random_pixels())))
    lazy = Image.open(path)
    assert load_image(lazy) is lazy
    assert np.array_equal(np.asarray(lazy), random_pixels())


def test_mode_and_transparency_survive_decoding():
    palette_image = Image.fromarray(random_pixels()).quantize(colors=16)
    loaded = load_image(png_bytes(palette_image, transparency=3))
    assert loaded.mode == "P"
    assert loaded.info["transparency"] == 3
    assert np.array_equal(np.asarray(loaded), np.asarray(palette_image))


def test_exif_orientation_is_applied_to_encoded_images():
    image = Image.fromarray(random_pixels(height=5, width=9))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored picture must be turned 90 degrees clockwise to view
    loaded = load_image(png_bytes(image, exif=exif))
    assert loaded.size == (5, 9)
    assert np.array_equal(np.asarray(loaded), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))


def test_float_arrays_in_unit_range_are_rounded_to_uint8():
    floats = np.array([[0.0, 1.0], [0.5, 0.2]], dtype=np.float32)
    loaded = load_image(floats)
    assert loaded.mode == "L"
    assert np.asarray(loaded).tolist() == [[0, 255], [128, 51]]


def test_array_is_copied_not_shared():
    pixels = random_pixels(channels=4)
    loaded = load_image(pixels)
    pixels[:] = 0
    assert np.asarray(loaded).any()


def test_load_images_takes_one_item_or_a_list():
    pixels = random_pixels()
    assert len(load_images(pixels)) == 1
    loaded = load_images([pixels, png_bytes(Image.fromarray(pixels))])
    assert [np.array_equal(np.asarray(image), pixels) for image in loaded] == [True, True]


# -- errors -------------------------------------------------------------------------------------------------

def corrupt_png() -> bytes:
    valid = png_bytes(Image.fromarray(random_pixels(height=64, width=64)))
    return valid[: len(valid) // 2]  # the header parses, the pixel data runs out


def test_corrupt_bytes(tmp_path):
    with pytest.raises(ValueError, match="could not decode image bytes: "):
        load_image(corrupt_png())
    with pytest.raises(ValueError, match="could not decode image bytes: "):
        load_image(b"definitely not an image")
    with pytest.raises(ValueError, match="could not decode image bytes: no data"):
        load_image(b"")


def test_corrupt_file_names_the_path(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(corrupt_png())
    with pytest.raises(ValueError, match=r"could not decode image file .*broken\.png"):
        load_image(path)
    with pytest.raises(ValueError, match="could not decode image: "):
        load_image(Image.open(path))  # opened lazily: the damage shows when the pixels are read


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nowhere" / "cat.png"
    with pytest.raises(ValueError, match=r"no such file: .*nowhere/cat\.png"):
        load_image(str(missing))
    with pytest.raises(ValueError, match=r"no such file: .*nowhere/cat\.png"):
        load_image(missing)
    with pytest.raises(ValueError, match="not a regular file"):
        load_image(tmp_path)


@pytest.mark.parametrize("url,message", [
    ("data:image/png;base64", "no ','"),
    ("data:image/png,rawdata", r"only ';base64,'"),
    ("data:image/png;base64,@@not-base64@@", "invalid base64"),
    ("data:image/png;base64,abc", "invalid base64"),  # bad padding
    ("data:text/plain;base64," + base64.b64encode(b"hi").decode(), "'text/plain'"),
    ("data:image/png;base64," + base64.b64encode(b"hello").decode(), "could not decode image bytes from data URL"),
])
def test_bad_data_urls(url, message):
    with pytest.raises(ValueError, match=message):
        load_image(url)


def test_long_data_url_is_shortened_in_the_error():
    url = "data:image/png;base64," + "A" * 10_000 + "!"
    with pytest.raises(ValueError) as error:
        load_image(url)
    assert len(str(error.value)) < 400


@pytest.mark.parametrize("array,message", [
    (np.zeros((3, 224, 224), np.uint8), r"got \(3, 224, 224\).*channel-first"),
    (np.zeros((4, 4, 2), np.uint8), r"\(H, W\), \(H, W, 3\) or \(H, W, 4\); got \(4, 4, 2\)"),
    (np.zeros((2, 2, 2, 3), np.uint8), r"got \(2, 2, 2, 3\)"),
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 3), np.int64), "dtype must be uint8.*got int64"),
    (np.zeros((4, 4), bool), "dtype must be uint8.*got bool"),
    (np.full((4, 4), 2.0), r"values in \[0, 1\]; got range \[2.0, 2.0\]"),
    (np.full((4, 4), np.nan), r"values in \[0, 1\]"),
])
def test_bad_arrays(array, message):
    with pytest.raises(ValueError, match=message):
        load_image(array)


@pytest.mark.parametrize("item,type_name", [(42, "int"), (None, "NoneType"), ([1, 2], "list"), (3.5, "float")])
def test_unsupported_types_list_what_is_accepted(item, type_name):
    with pytest.raises(ValueError, match=f"unsupported image input of type {type_name}; accepted: PIL.Image.Image"):
        load_image(item)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "HTTPS://example.com/cat.png"])
def test_remote_urls_are_not_fetched(url):
    with pytest.raises(ValueError, match="remote URLs are not fetched by load_image"):
        load_image(url)


def test_path_like_inputs_are_not_mistaken_for_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("http_cat.png").write_bytes(png_bytes(Image.fromarray(random_pixels())))
    assert load_image("http_cat.png").size == (21, 13)
