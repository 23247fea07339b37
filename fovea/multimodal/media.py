"""Turn what a user sends (PIL image, array, path, bytes, data URL) into decoded pixels.

Decoding happens here, once, at the request boundary, so a corrupt upload fails with a ValueError that
says what is wrong instead of surfacing later in a processor or in the model runner. Images keep their
mode (RGBA, P, L, ...): making them RGB is the model's image processor's job, because processors differ
in how they do it (BLIP composites transparency onto white, a plain `convert("RGB")` drops it).

Video loading (`load_video`) goes next to `load_image` and reuses the modality-neutral helpers below
(`_read_path`, `_parse_data_url`). Fetching http(s) URLs belongs to the server, which owns timeouts and
size limits; nothing here touches the network.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

ImageInput = Union[Image.Image, np.ndarray, str, os.PathLike, bytes, bytearray, memoryview]

_ACCEPTED_IMAGE_INPUTS = (
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
    raise ValueError(f"unsupported image input of type {type(item).__name__}; accepted: {_ACCEPTED_IMAGE_INPUTS}")


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


def _shorten(text: str) -> str:
    return repr(text) if len(text) <= _MAX_SHOWN_CHARS else repr(text[:_MAX_SHOWN_CHARS]) + f"... ({len(text)} chars)"
