"""Turn what a user sends (PIL image, array, path, bytes, data URL) into decoded pixels.

Decoding happens here, once, at the request boundary, so a corrupt upload fails with a ValueError that
says what is wrong instead of surfacing later in a processor or in the model runner. Images keep their
mode (RGBA, P, L, ...): making them RGB is the model's image processor's job, because processors differ
in how they do it (BLIP composites transparency onto white, a plain `convert("RGB")` drops it).

Videos (`load_video`) share the modality-neutral helpers (`_read_path`, `_parse_data_url`) and become
(T, H, W, 3) RGB frames: a stack of frames has one layout, so the image rule for RGB is applied here; files
are decoded with PyAV, seeking to the sampled frames (`video_decoding`). Fetching http(s) URLs belongs to the
server, which owns timeouts and size limits; nothing here touches the network.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from fovea.multimodal.processors.transforms import convert_to_rgb
from fovea.multimodal.video_decoding import (  # noqa: F401  (FrameSampler: load_video's callers name it here)
    FrameSampler,
    decode_frames,
    read_video_header,
    sample_video_indices,
)

ImageInput = Union[Image.Image, np.ndarray, str, os.PathLike, bytes, bytearray, memoryview]

ACCEPTED_IMAGE_INPUTS = (
    "PIL.Image.Image, numpy.ndarray ((H, W), (H, W, 3) or (H, W, 4); uint8, or float in [0, 1]), "
    "a file path (str or pathlib.Path), bytes, or a 'data:image/...;base64,...' URL"
)
_MAX_SHOWN_CHARS = 80  # of a user string quoted in an error; a data URL can be megabytes


def load_image(item: ImageInput) -> Image.Image:
    """Decode one image fully and return it as a PIL image in its own mode.

    - PIL images are returned as they are (the same object), after `load()`.
    - Arrays: (H, W) -> "L", (H, W, 3) -> "RGB", (H, W, 4) -> "RGBA". uint8 is taken as is; float arrays
      must hold values in [0, 1] and become uint8 as round(x * 255).
    - Encoded images (path, bytes, data URL) are decoded by Pillow, and an EXIF orientation tag is applied
      so the pixels are the upright picture a viewer shows (as transformers' `load_image` does).
    """
    if isinstance(item, Image.Image):
        try:
            item.load()  # a lazily opened file decodes only now
        except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ... on bad data
            raise ValueError(f"could not decode image: {e}") from e
        return item
    if isinstance(item, np.ndarray):
        return _image_from_array(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode_image(bytes(item), what="image bytes")
    if isinstance(item, str):
        scheme = item[:8].lower()
        if scheme.startswith("data:"):
            mime_type, data = _parse_data_url(item)
            if not mime_type.startswith("image/"):
                raise ValueError(f"data URL has media type {mime_type!r}; load_image needs 'image/...'")
            return _decode_image(data, what="image bytes from data URL")
        if scheme.startswith(("http://", "https://")):
            raise ValueError(
                f"remote URLs are not fetched by load_image: {_shorten(item)}; "
                "download the image and pass its bytes or path"
            )
        return _decode_image(_read_path(item), what=f"image file {item!r}")
    if isinstance(item, os.PathLike):
        return _decode_image(_read_path(item), what=f"image file {os.fspath(item)!r}")
    raise ValueError(f"unsupported image input of type {type(item).__name__}; accepted: {ACCEPTED_IMAGE_INPUTS}")


def load_images(items: ImageInput | list[ImageInput] | tuple[ImageInput, ...]) -> list[Image.Image]:
    """`load_image` over one item or a list (or tuple) of items."""
    if isinstance(items, (list, tuple)):
        return [load_image(item) for item in items]
    return [load_image(items)]


def _decode_image(data: bytes, what: str) -> Image.Image:
    if not data:
        raise ValueError(f"could not decode {what}: no data (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # reads EXIF, which can be as broken as the pixels
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ... on bad data
        raise ValueError(f"could not decode {what}: {e}") from e
    return image


def _image_from_array(array: np.ndarray) -> Image.Image:
    shape = array.shape
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and shape[2] in (3, 4):
        mode = "RGB" if shape[2] == 3 else "RGBA"
    else:
        hint = " (channel-first arrays are not accepted: use array.transpose(1, 2, 0))" if (
            array.ndim == 3 and shape[0] in (1, 3, 4)) else ""
        raise ValueError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4); got {shape}{hint}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"image array is empty: shape {shape}")
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if not (0.0 <= low and high <= 1.0):  # also false for NaN
            raise ValueError(f"float image arrays must hold values in [0, 1]; got range [{low}, {high}]")
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"image array dtype must be uint8, or float with values in [0, 1]; got {array.dtype}")
    # frombytes copies: an image made by fromarray can share the caller's buffer and change with it
    return Image.frombytes(mode, (shape[1], shape[0]), np.ascontiguousarray(array).tobytes())


def _read_path(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"no such file: {os.fspath(path)!r} (strings other than data: URLs are read as paths)")
    if not p.is_file():
        raise ValueError(f"not a regular file: {os.fspath(path)!r}")
    try:
        return p.read_bytes()
    except OSError as e:
        raise ValueError(f"could not read {os.fspath(path)!r}: {e}") from e


def _parse_data_url(url: str) -> tuple[str, bytes]:
    """'data:<media type>[;params];base64,<payload>' -> (media type, decoded payload)."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError(f"malformed data URL (no ',' before the payload): {_shorten(url)}")
    params = header[len("data:"):].split(";")
    mime_type = params[0].strip().lower()
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ValueError(f"malformed data URL (only ';base64,' payloads are supported): {_shorten(url)}")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"malformed data URL (invalid base64 payload: {e}): {_shorten(url)}") from e
    return mime_type, data


def type_name(item: object) -> str:
    """What a user passed, for an error message: 'torch.Tensor', 'numpy.ndarray', 'dict'."""
    cls = type(item)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _shorten(text: str) -> str:
    return repr(text) if len(text) <= _MAX_SHOWN_CHARS else repr(text[:_MAX_SHOWN_CHARS]) + f"... ({len(text)} chars)"


# ---------------------------------------------------------------------------------------------- video

VideoInput = Union["LoadedVideo", np.ndarray, list, tuple, str, os.PathLike, bytes, bytearray, memoryview]

_ACCEPTED_VIDEO_INPUTS = (
    "a numpy array of frames ((T, H, W), (T, H, W, 3) or (T, H, W, 4); uint8, or float in [0, 1]), a list of "
    "images (anything load_image takes), a video file path, its bytes, or a 'data:video/...;base64,...' URL"
)
UNKNOWN_VIDEO_FPS = 24.0
"""The rate of frames given without one: transformers' `VideoMetadata.sampled_fps` falls back to 24."""



@dataclass(slots=True)
class LoadedVideo:
    """Decoded RGB frames and the rate they are at (None: unknown, taken as `UNKNOWN_VIDEO_FPS`)."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float | None = None

    @property
    def sampled_fps(self) -> float:
        """The rate the model's positions use (transformers' `VideoMetadata.sampled_fps`)."""
        return UNKNOWN_VIDEO_FPS if self.fps is None else self.fps


def load_video(item: VideoInput, *, max_frames: int | None = None,
               sample_frames: FrameSampler | None = None) -> LoadedVideo:
    """Decode one video into RGB frames.

    - Frames given as an array or a list of images are taken as they are (all of them, at an unknown rate;
      `LoadedVideo(frames, fps)` gives them one); more than `max_frames` of them is an error. Images are made
      RGB as images are (transparency composited onto white), grey arrays repeated over three channels.
    - Files (path, bytes, data URL) are decoded with PyAV, keeping the frames `sample_frames` picks (all of
      them without one; more than `max_frames` is then an error). Their rate is the sampled one, as
      transformers' `VideoMetadata.sampled_fps`: kept / total frames times the stream's average rate.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if isinstance(item, LoadedVideo):
        video = LoadedVideo(_frames_from_array(item.frames), item.fps)
    elif isinstance(item, np.ndarray):
        video = LoadedVideo(_frames_from_array(item))
    elif isinstance(item, (list, tuple)):
        video = LoadedVideo(_frames_from_images(item))
    elif isinstance(item, (bytes, bytearray, memoryview)):
        video = _decode_video(bytes(item), "video bytes", sample_frames)
    elif isinstance(item, str) and item[:5].lower() == "data:":
        mime_type, data = _parse_data_url(item)
        if not mime_type.startswith("video/"):
            raise ValueError(f"data URL has media type {mime_type!r}; load_video needs 'video/...'")
        video = _decode_video(data, "video bytes from data URL", sample_frames)
    elif isinstance(item, str) and item[:8].lower().startswith(("http://", "https://")):
        raise ValueError(f"remote URLs are not fetched by load_video: {_shorten(item)}; download the video first")
    elif isinstance(item, (str, os.PathLike)):
        video = _decode_video(_read_path(item), f"video file {os.fspath(item)!r}", sample_frames)
    else:
        raise ValueError(f"unsupported video input of type {type(item).__name__}; accepted: {_ACCEPTED_VIDEO_INPUTS}")
    if max_frames is not None and len(video.frames) > max_frames:
        raise ValueError(f"the video has {len(video.frames)} frames, more than max_frames={max_frames}; pass fewer "
                         f"frames or raise max_frames (mm_processor_kwargs)")
    return video


def _frames_from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        if array.shape[-1] in (3, 4):
            raise ValueError(f"video array of shape {array.shape} looks like one image (H, W, C); a video is "
                             f"(T, H, W, 3) (or (T, H, W) grey)")
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"video array must have shape (T, H, W), (T, H, W, 3) or (T, H, W, 4); got {array.shape}")
    if 0 in array.shape[:3]:
        raise ValueError(f"video array is empty: shape {array.shape}")
    if array.shape[-1] != 3:  # grey or RGBA: go through the image rule so frames match what an image would give
        return _frames_from_images([_image_from_array(frame[..., 0] if frame.shape[-1] == 1 else frame)
                                    for frame in array])
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"float video arrays must hold values in [0, 1]; got range [{low}, {high}]")
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"video array dtype must be uint8, or float with values in [0, 1]; got {array.dtype}")
    return np.array(array, copy=True, order="C")


def _frames_from_images(items: list | tuple) -> np.ndarray:
    if not items:
        raise ValueError("a video given as a list of frames needs at least one frame")
    frames = [np.asarray(convert_to_rgb(load_image(item))) for item in items]
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"video frames differ in size: {sorted(s[:2] for s in sizes)} (height, width)")
    return np.stack(frames)


def _decode_video(data: bytes, what: str, sample_frames: FrameSampler | None) -> LoadedVideo:
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise ValueError(f"decoding {what} needs PyAV (pip install av); or pass the frames as an array") from e
    if not data:
        raise ValueError(f"could not decode {what}: no data (0 bytes)")
    try:
        header = read_video_header(data)
        decoded = decode_frames(data, sample_video_indices(header, sample_frames))
    except Exception as e:  # PyAV raises its own error types on bad data
        raise ValueError(f"could not decode {what}: {e}") from e
    if not decoded.frames:
        raise ValueError(f"could not decode {what}: no frames")
    num_kept, fps = len(decoded.frames), header.fps
    # operands in VideoMetadata.sampled_fps's order, so the float is the same to the last bit
    return LoadedVideo(np.stack(decoded.frames), num_kept / header.num_frames * fps if fps else None)
