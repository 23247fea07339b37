"""Properties of the media loaders under inputs nobody thought of: random bytes, real PNG/JPEG/GIF/WebP/BMP/TIFF
and MP4/WebM files truncated or with bytes overwritten, random data URLs and arrays.

Every input either loads (a fully decoded image / (T, H, W, 3) uint8 frames) or raises ValueError (the documented
error; the server's MediaTooLargeError is one) within a few seconds; never another exception. The loaders are
`fovea.multimodal.media` (what `LLM` runs) and `fovea.entrypoints.media_limits` (what the server runs first).
"""
from __future__ import annotations

import base64
import functools
import io
import time

import numpy as np
import pytest
from hypothesis import assume
from hypothesis import strategies as st
from PIL import Image

from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_limits import check_video, decode_image, probe_video
from fovea.multimodal.media import LoadedVideo, load_image, load_video
from tests.entrypoints.media_bombs import video as encode_video
from tests.fuzzing import fuzz

MAX_SECONDS = 5.0  # per example: a corrupt file is refused quickly, not decoded for ever
# damaged files make Pillow warn (a TIFF tag past the end) and NaN scales make numpy warn: both are the point here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
IMAGE_FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]
SERVER_LIMITS = MediaConfig(max_image_pixels=4096 * 4096, max_video_frame_pixels=1024 * 1024, max_video_frames=600)


def check_image(load, item) -> None:
    """`load(item)` is a decoded image with pixels, or a ValueError; in bounded time."""
    start = time.monotonic()
    try:
        image = load(item)
    except ValueError:
        pass
    else:
        assert isinstance(image, Image.Image)
        width, height = image.size
        assert width > 0 and height > 0
        assert np.asarray(image).shape[:2] == (height, width)  # decoded: the pixels are there
    assert time.monotonic() - start < MAX_SECONDS


def check_video_item(load, item) -> None:
    start = time.monotonic()
    try:
        video = load(item)
    except ValueError:
        pass
    else:
        assert isinstance(video, LoadedVideo)
        frames = video.frames
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3 and frames.shape[0] >= 1
        assert video.fps is None or video.fps > 0
    assert time.monotonic() - start < MAX_SECONDS


@st.composite
def encoded_images(draw) -> bytes:
    """A small real image file: format, mode and size drawn."""
    image_format = draw(st.sampled_from(IMAGE_FORMATS))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"]))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    if image_format == "JPEG" and mode in ("RGBA", "P"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@st.composite
def corrupted(draw, files) -> bytes:
    """`files` with one of: cut short, bytes overwritten, bytes inserted, or left as it is."""
    data = bytearray(draw(files))
    how = draw(st.sampled_from(["truncate", "overwrite", "insert", "none"]))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "overwrite":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@functools.cache
def real_videos() -> tuple[bytes, ...]:
    """mp4 (frame count in the header) and webm (counted from packets), a few frames each."""
    return tuple(encode_video(num_frames, width, height, container)
                 for num_frames, width, height, container in [(3, 16, 16, "mp4"), (5, 32, 16, "webm"),
                                                              (2, 16, 32, "mp4")])


videos = st.integers(0, 2).map(lambda i: real_videos()[i])


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


# ---- images -------------------------------------------------------------------------------------------------


@fuzz(60, data=st.binary(max_size=512))
def test_random_bytes_are_an_image_or_a_value_error(data):
    check_image(load_image, data)
    check_image(lambda d: decode_image(d, SERVER_LIMITS), data)


@fuzz(150, data=corrupted(encoded_images()))
def test_damaged_image_files_are_an_image_or_a_value_error(data):
    check_image(load_image, data)
    check_image(lambda d: decode_image(d, SERVER_LIMITS), data)
    check_image(load_image, data_url(data, "image/png"))


@fuzz(60, url=st.one_of(
    st.text(max_size=40).map(lambda t: "data:" + t),
    st.tuples(st.sampled_from(["image/png", "image/", "video/mp4", "", "IMAGE/PNG"]),
              st.sampled_from([";base64,", ",", ";charset=x;base64,", ";base64", ";BASE64,"]),
              st.text(alphabet="QUJDRA=+/ \n\t%", max_size=24)).map(lambda p: "data:" + "".join(p))))
def test_data_urls_are_parsed_or_refused(url):
    check_image(load_image, url)
    check_video_item(load_video, url)


@fuzz(60, shape=st.lists(st.integers(0, 6), min_size=0, max_size=5),
      dtype=st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_, np.uint16]),
      scale=st.sampled_from([1.0, 255.0, -1.0, float("nan"), float("inf")]))
def test_arrays_of_any_shape_and_dtype_are_an_image_or_a_value_error(shape, dtype, scale):
    array = (np.random.default_rng(0).random(shape) * scale).astype(dtype)
    check_image(load_image, array)
    check_video_item(load_video, array)


@fuzz(20, item=st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.text(max_size=20)))
def test_other_python_values_are_a_value_error(item):
    assume(not (isinstance(item, list) and item))  # a non-empty list is a video's frames, tested above
    with pytest.raises(ValueError):
        load_image(item if not isinstance(item, str) else "/nonexistent/" + item)
    with pytest.raises(ValueError):
        load_video(item if not isinstance(item, str) else "/nonexistent/" + item)


# ---- videos -------------------------------------------------------------------------------------------------


@fuzz(40, data=corrupted(videos), max_frames=st.none() | st.integers(1, 8),
      keep_every=st.none() | st.integers(1, 3))
def test_damaged_video_files_are_frames_or_a_value_error(data, max_frames, keep_every):
    sample = None if keep_every is None else (lambda total, fps: range(0, total, keep_every))
    check_video_item(lambda d: load_video(d, max_frames=max_frames, sample_frames=sample), data)
    check_video_item(lambda d: load_video(d), data_url(data, "video/mp4"))

    def probe(d):  # the server's header check, then the loader as the engine runs it
        header = probe_video(d)
        assert header.width >= 0 and header.height >= 0 and header.num_frames >= 0
        return load_video(check_video(d, SERVER_LIMITS))

    check_video_item(probe, data)


@fuzz(40, frames=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from(["RGB", "L", "RGBA", "P"])),
                          min_size=0, max_size=4))
def test_lists_of_frames_are_a_video_or_a_value_error(frames):
    images = [Image.new(mode, (w, h)) for w, h, mode in frames]
    check_video_item(load_video, images)
