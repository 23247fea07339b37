"""Content hashes of multimodal items: equal pixels and equal options give equal hashes, whatever form the
item arrived in; anything that can change the encoder's output changes the hash.

The hash keys the encoder cache and, through the placeholder tokens, the prefix cache, so a collision
would hand one request another's image. It therefore covers everything that decides the pixels a
processor sees: for a PIL image its mode, size, raw bytes, palette and `transparency` entry (a P image's
indices mean nothing without its palette, and the transparency decides what BLIP composites onto white); for a
decoded video its frames and their rate (the rate sets Qwen2.5-VL's temporal positions); for precomputed
embeddings given as a dict every tensor and number in it (the grid decides the token count and positions).
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from fovea.multimodal.media import LoadedVideo, load_image


def hash_mm_item(modality: str, item: Any, /, **processing_kwargs: Any) -> str:
    """sha256 hex digest over the modality, the item's decoded content and the processing options.

    `modality` and `item` are positional-only, so a user's processor option may be called anything.

    For modality "image", anything `load_image` accepts (path, bytes, data URL, array, PIL) is decoded
    first, so a path, its bytes and the PIL image they decode to hash the same. Torch tensors (for
    instance precomputed embeddings), and arrays of other modalities, hash as dtype, shape and raw bytes.
    Videos are hashed once decoded (a `LoadedVideo`: frames and rate), since how a file decodes depends on
    options (fps, max_frames) that only the model's loader applies. A dict (precomputed embeddings with their
    grid) hashes key by key, arrays and tensors alike; `*_grid_thw` values as flat int64, so [1, 4, 6],
    tensor([1, 4, 6]) and tensor([[1, 4, 6]]) are one grid.
    Options are compared as sorted JSON: pass them in canonical form (e.g. a processor's `to_dict()`).
    """
    if modality == "image" and not isinstance(item, (torch.Tensor, Mapping)):
        item = load_image(item)
    if isinstance(item, Mapping):
        meta, chunks = _dict_content(item)
    elif isinstance(item, LoadedVideo):
        meta, chunks = _video_content(item)
    elif isinstance(item, Image.Image):
        meta, chunks = _pil_content(item)
    elif isinstance(item, np.ndarray):
        meta, chunks = _array_content(item)
    elif isinstance(item, torch.Tensor):
        meta, chunks = _tensor_content(item)
    else:
        raise ValueError(f"cannot hash a {modality!r} item of type {type(item).__name__}; accepted: "
                         f"PIL.Image.Image, numpy.ndarray, torch.Tensor, LoadedVideo, or a dict of tensors and "
                         f"numbers (and for 'image' anything load_image takes)")
    header = {"modality": modality, "options": processing_kwargs, **meta}
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), default=_json_default).encode()
    hasher = hashlib.sha256()
    # The header's length comes first and fixes where it ends; the header fixes every chunk's length.
    hasher.update(len(header_bytes).to_bytes(8, "little"))
    hasher.update(header_bytes)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def _pil_content(image: Image.Image) -> tuple[dict[str, Any], list[bytes]]:
    pixels = image.tobytes()  # decodes a lazily opened image
    chunks = [pixels]
    meta: dict[str, Any] = {"kind": "pil", "mode": image.mode, "size": list(image.size),
                            "num_pixel_bytes": len(pixels)}
    if image.mode in ("P", "PA") and image.palette is not None:
        palette_mode = image.palette.mode
        palette = bytes(image.getpalette(rawmode=palette_mode) or [])
        meta.update(palette_mode=palette_mode, num_palette_bytes=len(palette))
        chunks.append(palette)
    transparency = image.info.get("transparency")
    if transparency is not None:
        # an int (palette index or grey level), an RGB tuple, or per-palette-entry alpha bytes
        meta["transparency"] = transparency.hex() if isinstance(transparency, bytes) else transparency
    return meta, chunks


def _array_content(array: np.ndarray) -> tuple[dict[str, Any], list[memoryview]]:
    if array.dtype.hasobject:
        raise ValueError("cannot hash an array of Python objects (dtype object)")
    array = np.ascontiguousarray(array)
    meta = {"kind": "array", "dtype": array.dtype.str, "shape": list(array.shape)}
    return meta, [memoryview(array.reshape(-1).view(np.uint8))]


def _tensor_content(tensor: torch.Tensor) -> tuple[dict[str, Any], list[memoryview]]:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # a uint8 view covers dtypes numpy lacks (bfloat16, float8)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, dtype=np.uint8)
    meta = {"kind": "tensor", "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
    return meta, [memoryview(raw)]


def _video_content(video: LoadedVideo) -> tuple[dict[str, Any], list[memoryview]]:
    frames = video.frames
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"LoadedVideo.frames must be a numpy array, got {type(frames).__name__}")
    meta, chunks = _array_content(frames)
    fps = None if video.fps is None else float(video.fps)  # 24 and 24.0 are one rate
    return {**meta, "kind": "video", "fps": fps}, chunks


def _dict_content(item: Mapping[Any, Any]) -> tuple[dict[str, Any], list[memoryview]]:
    """Every entry in key order: tensors and arrays as dtype, shape and bytes; numbers as floats."""
    entries: list[dict[str, Any]] = []
    chunks: list[memoryview] = []
    for key in sorted(item, key=str):
        if not isinstance(key, str):
            raise ValueError(f"a dict item's keys must be str, got {key!r}")
        value = item[key]
        if key.endswith("_grid_thw"):
            try:
                value = torch.as_tensor(value, dtype=torch.long).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{key} must be integers (t, h, w), got {value!r}") from e
        elif isinstance(value, np.ndarray):
            try:
                value = torch.from_numpy(np.ascontiguousarray(value))  # hashes as the tensor it becomes
            except TypeError as e:
                raise ValueError(f"{key}: numpy dtype {value.dtype} has no torch equivalent") from e
        elif isinstance(value, (list, tuple)):
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{key} must be a tensor, an array or numbers, got {type(value).__name__}") from e
        if isinstance(value, torch.Tensor):
            meta, (chunk,) = _tensor_content(value)
            entries.append({"key": key, **meta})
            chunks.append(chunk)
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            entries.append({"key": key, "kind": "number", "value": float(value)})
        else:
            raise ValueError(f"cannot hash {key}={type(value).__name__} in a dict item; values must be tensors, "
                             f"arrays or numbers")
    return {"kind": "dict", "entries": entries}, chunks


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ValueError(f"processing option value {value!r} of type {type(value).__name__} has no stable JSON form")
